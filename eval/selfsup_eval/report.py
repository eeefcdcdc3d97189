"""Results: a terminal table, results.json, results.csv and accuracy_vs_step.png (atomic writes)."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def table(records: list[dict]) -> str:
    ks = sorted({k for r in records for k in r.get("knn", {})}, key=lambda s: int(s[2:]))
    head = ["checkpoint", "step"] + [f"kNN {k}" for k in ks]
    if any("linear" in r for r in records):
        head += ["linear top1", "linear top5"]
    rows = []
    for r in records:
        row = [r["name"], str(r["step"])] + [f"{100 * r['knn'][k]:.2f}" if k in r.get("knn", {}) else "-" for k in ks]
        if "linear" in head[-2]:
            lin = r.get("linear")
            row += [f"{100 * lin['top1']:.2f}", f"{100 * lin['top5']:.2f}"] if lin else ["-", "-"]
        rows.append(row)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows])


def write(out_dir: str, records: list[dict]) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "results.json", json.dumps(records, indent=1).encode())
    buf = io.StringIO()
    ks = sorted({k for r in records for k in r.get("knn", {})}, key=lambda s: int(s[2:]))
    writer = csv.writer(buf)
    writer.writerow(["path", "step", "objective"] + [f"knn_{k}" for k in ks] +
                    ["linear_top1", "linear_top5", "linear_wd"])
    for r in records:
        lin = r.get("linear") or {}
        writer.writerow([r["path"], r["step"], r["objective"]] + [r.get("knn", {}).get(k, "") for k in ks] +
                        [lin.get("top1", ""), lin.get("top5", ""), lin.get("wd", "")])
    _atomic_write(out / "results.csv", buf.getvalue().encode())
    runs = [r for r in records if r["path"] != "raw-pixels"]
    if len(runs) > 1:
        plot(out / "accuracy_vs_step.png", runs)


def plot(path: Path, records: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [r["step"] for r in records]
    for k in sorted({k for r in records for k in r.get("knn", {})}, key=lambda s: int(s[2:])):
        ax.plot(steps, [100 * r["knn"].get(k, float("nan")) for r in records], marker="o", label=f"k-NN {k}")
    if any("linear" in r for r in records):
        ax.plot(steps, [100 * r["linear"]["top1"] if "linear" in r else float("nan") for r in records],
                marker="s", label="linear top-1")
    ax.set_xlabel("step")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
