"""Low-shot protocols: k-NN, linear and k-NN ⊕ linear on labelled subsets of the train split.

``--shots N`` keeps N labelled images per class, ``--fraction F`` a class-stratified share F of the
train split (max(1, round(F·n_c)) images of a class with n_c); each over ``--subsets`` random
subsets (default 5), reported as mean ± std (sample std, n − 1) over them, val always whole. The
features come from the one cached extraction: a subset is a set of rows of the train features.

``--subset-file FILE`` uses a fixed list instead (one line per image: a sample key, or the file
name a folder source was written from, which selfsup-shards keeps in each sample's ``json``
``path``), e.g. the ImageNet 1 % / 10 % lists SimCLR's authors published and most papers use. A
file is one subset, not a draw: its figures (std 0) compare with published ones; ``--fraction
0.01`` figures do not (another 1 % of the images, a spread of several points between draws).

Why the subsets are seeded from the labels: every checkpoint of a comparison (and every rerun)
must be scored on the same images, or a difference between checkpoints could be a difference
between draws. The seed of subset i of a protocol is a hash of the train labels in extraction
order (the same for every checkpoint on the same shards), the protocol's name and i; nothing
depends on the checkpoint or on the order the checkpoints are given in.

Choices inside a subset use the subset only: the probe's penalty and k-NN ⊕ linear's λ, k, T
are chosen on a class-stratified 10 % of it (at least one image of every class that has two; a
1-shot subset has none to spare, so the defaults of :mod:`selfsup_eval.knn_linear` apply). The
k-NN column is the weighted k-NN at T = ``--temperature`` and k = min(20, subset size) (the first
``--k`` if 20 is not among them).
"""

from __future__ import annotations

import hashlib
import os

import torch

from selfsup_eval.checkpoint import EvalError
from selfsup_io.knn import knn_classify, topk_accuracy
from selfsup_eval.knn_linear import knn_linear
from selfsup_eval.linear import fit_probe

HOLDOUT = 0.1


def protocols(shots=None, fractions=None, files=None) -> list[tuple[str, str, object]]:
    """``[(name, kind, value)]``: ``("10-shot", "shots", 10)``, ``("1%", "fraction", 0.01)``,
    ``("file:1percent.txt", "file", "/path/1percent.txt")``."""
    out = [(f"{int(n)}-shot", "shots", int(n)) for n in shots or []]
    out += [(f"{100 * f:g}%", "fraction", float(f)) for f in fractions or []]
    out += [(f"file:{os.path.basename(f)}", "file", str(f)) for f in files or []]
    return out


def read_subset_file(path: str) -> list[str]:
    """The non-empty lines of a subset list (``#`` starts a comment line)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f]
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"--subset-file {path}: cannot read it ({e})") from None
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise EvalError(f"--subset-file {path} lists no image")
    return lines


def _source_names(urls) -> dict[str, str]:
    """file name (and its stem) → sample key, from the ``json`` ``path`` of every train sample."""
    import json

    from selfsup_eval.data import shard_samples

    names = {}
    for url in urls or []:
        for raw in shard_samples(url):
            try:
                path = json.loads(raw["json"]).get("path") if "json" in raw else None
            except (ValueError, AttributeError):
                path = None
            if isinstance(path, str):
                base = os.path.basename(path)
                names.setdefault(base, raw["__key__"])
                names.setdefault(os.path.splitext(base)[0], raw["__key__"])
    return names


def subset_from_file(path: str, keys: list[str], urls=None) -> torch.Tensor:
    """Sorted train rows named by the lines of ``path`` (sample keys, else source file names)."""
    lines = read_subset_file(path)
    row = {k: i for i, k in enumerate(keys)}
    missing = [ln for ln in lines if ln not in row]
    if missing:
        names = _source_names(urls)
        lines = [ln if ln in row else names.get(ln, names.get(os.path.splitext(ln)[0], ln)) for ln in lines]
        missing = [ln for ln in lines if ln not in row]
    if missing:
        raise EvalError(f"--subset-file {path}: {len(missing)} of {len(lines)} line(s) name no train sample "
                        f"(e.g. {missing[0]!r}): lines are sample keys or the source file names of the train shards")
    return torch.tensor(sorted({row[ln] for ln in lines}), dtype=torch.long)


def subset_seed(labels: torch.Tensor, name: str, i: int) -> int:
    h = hashlib.sha256(labels.to(torch.int64).cpu().numpy().tobytes())
    h.update(f"|{name}|{i}".encode())
    return int.from_bytes(h.digest()[:8], "little") & ((1 << 63) - 1)


def draw_subset(labels: torch.Tensor, kind: str, value: float, seed: int) -> torch.Tensor:
    """Sorted train indices of one class-balanced subset."""
    g = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    picked = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().squeeze(1)
        n = int(value) if kind == "shots" else max(1, round(value * len(idx)))
        if n > len(idx):
            raise EvalError(f"--shots {int(value)}: class {c} has only {len(idx)} train samples")
        picked.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    return torch.cat(picked).sort().values


def stratified_holdout(labels: torch.Tensor, seed: int, share: float = HOLDOUT) -> torch.Tensor:
    """Positions (into ``labels``) held out for the choices: per class with n ≥ 2 images,
    min(n − 1, max(1, round(share·n))) of them; none of a class with one image."""
    g = torch.Generator().manual_seed(seed + 1)
    labels = labels.cpu()
    held = [torch.zeros(0, dtype=torch.long)]
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().squeeze(1)
        if len(idx) >= 2:
            held.append(idx[torch.randperm(len(idx), generator=g)[:min(len(idx) - 1, max(1, round(share * len(idx))))]])
    return torch.cat(held).sort().values


def _summary(runs: list[float]) -> dict:
    t = torch.tensor(runs, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(runs) > 1 else 0.0, "runs": runs}


def lowshot(ftrain: dict, fval: dict, protos, subsets: int = 5, *, methods=("knn", "linear", "knn_linear"),
            ks=(20,), temperature: float = 0.07, knn_loss: float = 0.0, device="cpu", train_urls=None) -> dict:
    """``{name: {method: {"mean", "std", "runs"}, "subsets", "train_samples", "knn_k"}}``
    (a ``--subset-file`` protocol is one fixed subset; ``train_urls`` map its file names to keys)."""
    x, y = ftrain["features"], ftrain["label"]
    vx, vy = fval["features"].to(device), fval["label"]
    k_col = 20 if 20 in ks else min(ks)
    out = {}
    for name, kind, value in protos:
        runs = {m: [] for m in methods}
        sizes, kk = [], None
        draws = 1 if kind == "file" else subsets
        fixed = subset_from_file(value, ftrain["key"], train_urls) if kind == "file" else None
        for i in range(draws):
            seed = subset_seed(y, name, i)
            sub = fixed if fixed is not None else draw_subset(y, kind, value, seed)
            sx, sy = x[sub].to(device), y[sub]
            sizes.append(len(sub))
            if "knn" in methods:
                kk = min(k_col, len(sub))
                ranked = knn_classify(sx, sy, vx, ks=(kk,), temperature=temperature,
                                      num_classes=int(max(sy.max(), vy.max())) + 1)[kk]
                runs["knn"].append(topk_accuracy(ranked, vy, 1))
            if "linear" in methods or "knn_linear" in methods:
                if len(sub) < 2:
                    raise EvalError(f"{name}: a subset of {len(sub)} sample cannot train a linear probe")
                hold = stratified_holdout(sy, seed)
                if "knn_linear" in methods or knn_loss > 0:  # the k-NN-weighted probe lives there
                    both = knn_linear(sx, sy, vx, vy, device=device, knn_loss=knn_loss, hold=hold, seed=seed)
                    if "knn_linear" in runs:
                        runs["knn_linear"].append(both["knn_linear"]["top1"])
                    lin = both["linear"]
                else:
                    lin = fit_probe(sx, sy, vx, vy, device=device, seed=seed, hold=hold).record
                if "linear" in runs:
                    runs["linear"].append(lin["top1"])
        out[name] = {m: _summary(r) for m, r in runs.items()}
        out[name].update(subsets=draws, train_samples=sizes[0] if len(set(sizes)) == 1 else sizes,
                         knn_k=kk)
    return out
