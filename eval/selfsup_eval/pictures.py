"""The pictures ``selfsup-eval all ... --out DIR`` draws of one checkpoint (matplotlib, Agg).

* ``neighbours.png``: val queries, one per class (up to :data:`QUERIES` classes, chosen with a
  fixed seed), each followed by its :data:`NEIGHBOURS` nearest train images by the k-NN's cosine;
  a neighbour of another label is framed red and crossed out. The picture people look at first:
  it shows what the backbone thinks is alike;
* ``map.png``: a 2-D map of the val features (at most :data:`MAP_POINTS`, seeded subsample),
  coloured by label: UMAP when ``umap-learn`` is installed, else scikit-learn's t-SNE (seeded, PCA
  initialisation); the title says which;
* ``confusion.png``: the linear probe's confusion matrix on val, each row normalised to 1, class
  names from the shards' index;
* ``curves.png`` (for a run directory with ``metrics.jsonl``): loss, learning rate, the online
  monitor's k-NN top-1 and effective rank (RankMe) against step, as the trainer logs them.

Images for ``neighbours.png`` are read back from the shards by key; only the shards holding the
shown samples are opened (the features' per-row shard index says which).
Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

QUERIES, NEIGHBOURS, MAP_POINTS, SEED = 8, 8, 2000, 0
THUMB = 64  # pixels per thumbnail side
CURVES = (("loss", "loss"), ("lr", "learning rate"), ("monitor/knn_top1", "monitor k-NN top-1"),
          ("monitor/rankme", "effective rank (RankMe)"))


def select_queries(labels, seed: int = SEED, classes: int = QUERIES) -> list[int]:
    """Val rows to show: the classes present (sorted; a seeded choice of ``classes`` of them when
    there are more), and one seeded row of each."""
    labels = np.asarray(labels)
    present = np.unique(labels[labels >= 0])
    rng = np.random.default_rng(seed)
    if len(present) > classes:
        present = np.sort(rng.choice(present, classes, replace=False))
    return [int(rng.choice(np.flatnonzero(labels == c))) for c in present]


def nearest(train_x: torch.Tensor, query_x: torch.Tensor, k: int = NEIGHBOURS) -> torch.Tensor:
    """Top-k train rows per query by cosine, ties by train index (as the retrieval metrics)."""
    s = F.normalize(query_x.float(), dim=1) @ F.normalize(train_x.float(), dim=1).T
    return s.sort(dim=1, descending=True, stable=True).indices[:, :min(k, len(train_x))]


def _name(label: int, names) -> str:
    return str(names[label]) if names and 0 <= label < len(names) else str(label)


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` through a temp file and a rename, and close it."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def thumbnails(urls: list[str], wanted: dict[str, int], shard_of: dict[str, int] | None) -> dict:
    """``{key: RGB uint8 array}`` for the keys in ``wanted``, reading only their shards, each
    only as far as its last wanted sample (a tar is read from its start)."""
    from contextlib import closing

    from PIL import Image

    from selfsup_eval.data import shard_samples
    from selfsup_io import image_member

    if shard_of:
        plan = {}
        for k in wanted:
            plan.setdefault(shard_of[k], set()).add(k)
    else:  # an older cache without per-row shards: scan until everything is found
        plan = {si: set(wanted) for si in range(len(urls))}
    out = {}
    for si in sorted(plan):
        todo = plan[si] - set(out)
        if not todo:
            continue
        with closing(shard_samples(urls[si])) as samples:
            for raw in samples:
                key = raw["__key__"]
                if key not in todo:
                    continue
                try:
                    with Image.open(io.BytesIO(image_member(raw))) as img:
                        img.draft("RGB", (THUMB * 2, THUMB * 2))
                        img = img.convert("RGB")
                        img.thumbnail((THUMB, THUMB))
                        out[key] = np.asarray(img)
                except Exception:  # a corrupt image was never a row; be safe anyway
                    out[key] = np.zeros((THUMB, THUMB, 3), np.uint8)
                todo.discard(key)
                if not todo:
                    break
    return out


def neighbours_png(path: Path, ftrain: dict, fval: dict, train_urls, val_urls, names=None) -> Path:
    queries = select_queries(fval["label"].numpy())
    nbrs = nearest(ftrain["features"], fval["features"][queries]).tolist()
    qkeys = {fval["key"][q]: q for q in queries}
    tkeys = {ftrain["key"][j]: j for row in nbrs for j in row}

    def shard_map(f, keys):
        return {k: int(f["shard"][i]) for k, i in keys.items()} if "shard" in f else None

    qimg = thumbnails(val_urls, qkeys, shard_map(fval, qkeys))
    timg = thumbnails(train_urls, tkeys, shard_map(ftrain, tkeys))
    plt = _plt()
    cols = 1 + NEIGHBOURS
    fig, axes = plt.subplots(len(queries), cols, figsize=(1.2 * cols, 1.3 * len(queries)), squeeze=False)
    blank = np.zeros((THUMB, THUMB, 3), np.uint8)
    for r, (q, row) in enumerate(zip(queries, nbrs)):
        y = int(fval["label"][q])
        cells = [(qimg.get(fval["key"][q], blank), f"query: {_name(y, names)}", None)]
        for j in row:
            yj = int(ftrain["label"][j])
            cells.append((timg.get(ftrain["key"][j], blank), _name(yj, names), yj == y))
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            if c >= len(cells):
                ax.axis("off")
                continue
            img, title, ok = cells[c]
            ax.imshow(img)
            ax.set_title(title[:14], fontsize=7, color="red" if ok is False else "black")
            colour, width = {None: ("blue", 2.5), True: ("0.6", 0.8), False: ("red", 3.0)}[ok]
            for spine in ax.spines.values():
                spine.set_edgecolor(colour), spine.set_linewidth(width)
            if ok is False:
                ax.plot([0, img.shape[1] - 1], [0, img.shape[0] - 1], color="red", linewidth=1.5)
    fig.suptitle(f"val query (blue) and its {NEIGHBOURS} nearest train images; red: another label",
                 fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def map_png(path: Path, features: torch.Tensor, labels, names=None, seed: int = SEED) -> tuple[Path, str]:
    """Returns the path and the method used ("UMAP" or "t-SNE")."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(labels), MAP_POINTS, replace=False)) if len(labels) > MAP_POINTS \
        else np.arange(len(labels))
    x = F.normalize(features[torch.as_tensor(rows)].float(), dim=1).numpy()
    try:
        import umap  # optional: umap-learn

        xy, method = umap.UMAP(random_state=seed).fit_transform(x), "UMAP"
    except ImportError:
        from sklearn.manifold import TSNE

        xy = TSNE(2, perplexity=min(30.0, max(1.0, (len(x) - 1) / 3)), init="pca",
                  random_state=seed).fit_transform(x)
        method = "t-SNE"
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab10" if len(np.unique(labels)) <= 10 else "tab20")
    for i, c in enumerate(np.unique(labels[rows])):
        m = labels[rows] == c
        ax.scatter(xy[m, 0], xy[m, 1], s=5, color=cmap(i % cmap.N), label=_name(int(c), names))
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(f"{method} of {len(rows)} val features (cosine geometry), seed {seed}", fontsize=10)
    ax.legend(fontsize=7, markerscale=3, loc="best")
    fig.tight_layout()
    return save_figure(fig, path), method


def confusion_png(path: Path, y_true, y_pred, names=None) -> Path:
    from sklearn.metrics import confusion_matrix

    classes = np.unique(np.concatenate([np.asarray(y_true), np.asarray(y_pred)]))
    cm = confusion_matrix(y_true, y_pred, labels=classes, normalize="true")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(cm, vmin=0, vmax=1, cmap="Blues")
    ticks = [_name(int(c), names)[:16] for c in classes]
    ax.set_xticks(range(len(classes)), ticks, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(classes)), ticks, fontsize=7)
    if len(classes) <= 20:
        for i in range(len(classes)):
            for j in range(len(classes)):
                if cm[i, j] >= 0.005:
                    ax.text(j, i, f"{cm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if cm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted"), ax.set_ylabel("true")
    ax.set_title("linear probe on val: share of each true class (rows sum to 1)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return save_figure(fig, path)


def read_metrics(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut by a killed run
            continue
    return [r for r in rows if isinstance(r, dict) and "step" in r]


def curves_png(path: Path, run_dir: str | None) -> Path | None:
    """The run's training curves, or None without a ``metrics.jsonl`` holding any of them."""
    src = Path(run_dir) / "metrics.jsonl" if run_dir else None
    if src is None or not src.is_file():
        return None
    rows = read_metrics(src)
    shown = [(k, t) for k, t in CURVES if any(r.get(k) is not None for r in rows)]
    if not shown:
        return None
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), squeeze=False)
    for ax, (key, title) in zip(axes.flat, shown):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None)
        ax.set_title(title, fontsize=10), ax.set_xlabel("step", fontsize=8), ax.grid(alpha=0.3)
        if key == "loss" and min(v for _, v in pts) > 0:
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.suptitle(f"{Path(run_dir).name}: training curves (metrics.jsonl)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def draw(out_dir, name: str, ftrain: dict, fval: dict, train, val, linear_pred=None,
         run_dir: str | None = None) -> list[tuple[str, str]]:
    """Every picture of one checkpoint into ``out_dir``: ``[(file name, one-line caption)]``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = train.class_names or val.class_names
    done = []

    def attempt(what, fn):
        try:
            return fn()
        except Exception as e:  # a picture is an aid: its failure must not cost the results
            print(f"selfsup-eval: warning: could not draw {what} ({type(e).__name__}: "
                  f"{' '.join(str(e).split())[:200]})", file=sys.stderr)
            return None

    if attempt("neighbours.png", lambda: neighbours_png(out / "neighbours.png", ftrain, fval, train.urls,
                                                       val.urls, names)):
        done.append(("neighbours.png", f"{name}: one val query per class (seed {SEED}) and its "
                     f"{NEIGHBOURS} nearest train images by cosine; red frame and cross: another label."))
    drawn = attempt("map.png", lambda: map_png(out / "map.png", fval["features"], fval["label"].numpy(), names))
    if drawn:
        shown = min(MAP_POINTS, len(fval["label"]))
        done.append(("map.png", f"{name}: {drawn[1]} map of {shown} val features (seed {SEED}), coloured "
                     "by label (classes that separate here separate for the k-NN)."))
    if linear_pred is not None and attempt("confusion.png", lambda: confusion_png(
            out / "confusion.png", fval["label"].numpy(), linear_pred.cpu().numpy(), names)):
        done.append(("confusion.png", f"{name}: the linear probe's confusion matrix on val, each "
                     "row (true class) normalised to 1."))
    if attempt("curves.png", lambda: curves_png(out / "curves.png", run_dir)) is not None:
        done.append(("curves.png", f"{Path(run_dir).name}: loss, learning rate, monitor k-NN top-1 "
                     "and effective rank against step, from its metrics.jsonl."))
    return done
