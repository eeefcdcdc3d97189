"""Results: a terminal table, ``results.json``, ``results.csv`` and ``accuracy_vs_step.png``.

Every file is written to a temporary name in the output folder and renamed into place, so a
reader (a dashboard, a sweep script) never sees a half-written file and an interrupted run
leaves the previous results intact. The plot is drawn only when some run contributes at least
two checkpoints (a curve needs two points); baselines (``--baseline``, e.g. raw pixels) are
drawn as horizontal lines for reference.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _ks(records: list[dict]) -> list[str]:
    return sorted({k for r in records for k in r.get("knn", {})}, key=lambda s: int(s[2:]))


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


RETRIEVAL_KS = (1, 5, 10)


def table(records: list[dict]) -> str:
    """A markdown-style table: k-NN top-1 per k, linear top-1/top-5, k-NN ⊕ linear, retrieval
    recall@1/5/10 and mAP@R (:mod:`selfsup_eval.retrieval`), in percent."""
    return _grid(*table_rows(records))


def table_rows(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The header and rows of :func:`table` (also the HTML report's, :mod:`selfsup_eval.html`)."""
    ks = _ks(records)
    head = ["checkpoint", "step", "objective"] + [f"kNN {k} top1" for k in ks]
    linear = any("linear" in r for r in records)
    if linear:
        head += ["linear top1", "linear top5"]
    both = any("knn_linear" in r for r in records)
    if both:
        head += ["kNN⊕lin top1", "kNN⊕lin top5", "λ, k"]
    retrieval = any("retrieval" in r for r in records)
    if retrieval:
        head += [f"R@{k}" for k in RETRIEVAL_KS] + ["mAP@R"]
    rows = []
    for r in records:
        row = [r["name"], str(r.get("step", "-")), str(r.get("objective") or "-")]
        row += [_pct(r.get("knn", {}).get(k)) for k in ks]
        if linear:
            lin = r.get("linear") or {}
            row += [_pct(lin.get("top1")), _pct(lin.get("top5"))]
        if both:
            kl = r.get("knn_linear") or {}
            row += [_pct(kl.get("top1")), _pct(kl.get("top5")),
                    f"{kl['lambda']:g}, {kl['k']}" if kl else "-"]
        if retrieval:
            ret = r.get("retrieval") or {}
            row += [_pct(ret.get(f"recall@{k}")) for k in RETRIEVAL_KS] + [_pct(ret.get("map@r"))]
        rows.append(row)
    return head, rows


def _grid(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]

    def fmt(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows])


def _pm(s: dict | None) -> str:
    return "-" if not s else f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"


def lowshot_table(records: list[dict]) -> str | None:
    """Low-shot results, one row per (checkpoint, protocol): mean ± std top-1 over the subsets."""
    rows = lowshot_rows(records)
    return _grid(*rows) if rows else None


def lowshot_rows(records: list[dict]) -> tuple[list[str], list[list[str]]] | None:
    rows = []
    methods = [m for m in ("knn", "linear", "knn_linear") if any(m in p for r in records
                                                                 for p in r.get("lowshot", {}).values())]
    for r in records:
        for name, res in r.get("lowshot", {}).items():
            rows.append([r["name"], name, str(res["train_samples"]), str(res["subsets"])]
                        + [_pm(res.get(m)) for m in methods])
    if not rows:
        return None
    names = {"knn": "kNN top1", "linear": "linear top1", "knn_linear": "kNN⊕lin top1"}
    return ["checkpoint", "labels", "train images", "subsets"] + [names[m] for m in methods], rows


def _lowshot_columns(records: list[dict]) -> list[tuple[str, str]]:
    seen = []
    for r in records:
        for name, res in r.get("lowshot", {}).items():
            for m in ("knn", "linear", "knn_linear"):
                if m in res and (name, m) not in seen:
                    seen.append((name, m))
    return seen


def _blank(x):
    return "" if x is None else x


def to_csv(records: list[dict]) -> str:
    ks, low = _ks(records), _lowshot_columns(records)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["name", "path", "step", "objective"] + [f"knn_top1_{k}" for k in ks]
                    + [f"knn_top5_{k}" for k in ks]
                    + ["linear_top1", "linear_top5", "linear_lr", "linear_wd", "train_samples",
                       "val_samples", "corrupt_samples", "knn_linear_top1", "knn_linear_top5",
                       "knn_linear_lambda", "knn_linear_k", "knn_linear_temperature"]
                    + [f"retrieval_recall@{k}" for k in RETRIEVAL_KS] + ["retrieval_map@r"]
                    + [f"lowshot_{name}_{m}_{stat}" for name, m in low for stat in ("mean", "std")])
    for r in records:
        lin, kl = r.get("linear") or {}, r.get("knn_linear") or {}
        writer.writerow([r["name"], r["path"], r["step"], r.get("objective")]
                        + [r.get("knn", {}).get(k, "") for k in ks]
                        + [r.get("knn_top5", {}).get(k, "") for k in ks]
                        + [lin.get("top1", ""), lin.get("top5", ""), lin.get("lr", ""),
                           lin.get("wd", ""), r.get("train_samples", ""), r.get("val_samples", ""),
                           r.get("corrupt_samples", "")]
                        + [kl.get(f, "") for f in ("top1", "top5", "lambda", "k", "temperature")]
                        + [_blank((r.get("retrieval") or {}).get(f"recall@{k}")) for k in RETRIEVAL_KS]
                        + [_blank((r.get("retrieval") or {}).get("map@r"))]
                        + [r.get("lowshot", {}).get(name, {}).get(m, {}).get(stat, "")
                           for name, m in low for stat in ("mean", "std")])
    return buf.getvalue()


def write(out_dir: str, records: list[dict]) -> list[Path]:
    """Write results.json, results.csv and (when a run has ≥ 2 checkpoints) the plot."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "results.csv"]
    _atomic_write(written[0], (json.dumps(records, indent=1) + "\n").encode())
    _atomic_write(written[1], to_csv(records).encode())
    runs: dict[str, list[dict]] = {}
    for r in records:
        if r.get("run") and not r.get("baseline"):
            runs.setdefault(r["run"], []).append(r)
    curves = {run: sorted(rs, key=lambda r: r["step"]) for run, rs in runs.items() if len(rs) > 1}
    if curves:
        written.append(out / "accuracy_vs_step.png")
        plot(written[-1], curves, [r for r in records if r.get("baseline")])
    return written


def plot(path: Path, curves: dict[str, list[dict]], baselines: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    several = len(curves) > 1
    for run, records in curves.items():
        steps = [r["step"] for r in records]
        label = f"{Path(run).name}: " if several else ""
        for k in _ks(records):
            ax.plot(steps, [100 * r["knn"][k] if k in r.get("knn", {}) else float("nan") for r in records],
                    marker="o", label=f"{label}k-NN {k}")
        if any("linear" in r for r in records):
            ax.plot(steps, [100 * r["linear"]["top1"] if "linear" in r else float("nan") for r in records],
                    marker="s", label=f"{label}linear")
    for b, style in zip(baselines, ("--", ":", "-.") * len(baselines)):
        knn = b.get("knn", {})
        k = "k=20" if "k=20" in knn else next(iter(knn), None)  # one line per baseline
        if k is not None:
            ax.axhline(100 * knn[k], linestyle=style, linewidth=1, color="grey",
                       label=f"{b['name']} k-NN {k} (baseline)")
    ax.set_xlabel("step")
    ax.set_ylabel("val top-1 accuracy (%)")
    ax.set_title(Path(next(iter(curves))).name if not several else "accuracy vs step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    from selfsup_eval.pictures import save_figure

    save_figure(fig, path)  # temp file, then rename: never a half-written picture


def tracker_metrics(record: dict) -> dict[str, float]:
    """A results.json record as flat tracker metrics: ``knn/k20``, ``linear/top1``... (only
    letters, digits, ``_ - . /``: MLflow refuses other characters in metric names)."""
    out = {}

    def walk(value, key):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}/{k}" if key else str(k))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out["".join(c for c in key if c.isalnum() or c in "_-./")] = value

    for section in ("knn", "knn_top5", "linear", "knn_linear", "lowshot", "retrieval"):
        if section in record:
            walk(record[section], section)
    return out


def to_trackers(records: list[dict], args) -> None:
    """Log each checkpoint's results at its training step (baselines under ``baseline/NAME/``)
    to the trackers of ``--trackers``, in one tracker run named after ``--out``."""
    from selfsup_io.tracking import Trackers

    out = Path(args.out)
    trackers = Trackers(args.trackers, out, args.project, f"eval-{out.resolve().name}",
                        config={"train": args.train, "val": args.val,
                                "checkpoints": [r["name"] for r in records]}, key="--trackers")
    try:
        for r in records:
            metrics = tracker_metrics(r)
            if r.get("baseline"):
                metrics = {f"baseline/{r['name']}/{k}": v for k, v in metrics.items()}
            trackers.log(metrics, step=int(r.get("step") or 0))
    finally:
        trackers.finish()

