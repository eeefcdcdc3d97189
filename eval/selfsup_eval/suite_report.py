"""A suite's outputs: the printed tables and verdicts, ``results.json``, ``suite.csv``, ``suite.png``.

One table per protocol: rows are checkpoints, columns the tasks (top-1 %, ± std over draws when
there are several), then each group's mean and the overall mean. Files are written to temporary
names and renamed (:func:`selfsup_eval.report._atomic_write`), so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from selfsup_eval.report import _atomic_write, _grid

NAMES = {"knn": "k-NN", "linear": "linear", "knn_linear": "k-NN ⊕ linear", "finetune": "finetune"}


def _tasks(records):
    return list(records[0]["suite"]["tasks"]) if records else []


def _groups(records):
    seen = []
    for r in records:
        for g in r["suite"]["groups"]:
            if g not in seen:
                seen.append(g)
    return seen


def _cell(res: dict | None, subsets: int) -> str:
    if not res:
        return "-"
    return f"{100 * res['top1']:.2f}" + (f" ± {100 * res['std']:.2f}" if subsets > 1 else "")


def tables(records: list[dict], protocols, subsets: int) -> str:
    tasks, groups = _tasks(records), _groups(records)
    blocks = []
    for p in protocols:
        head = ["checkpoint"] + tasks + [f"{g} mean" for g in groups] + ["mean"]
        rows = []
        for r in records:
            s = r["suite"]
            row = [r["name"]] + [_cell(s["tasks"][t].get(p), subsets) for t in tasks]
            row += [f"{100 * s['groups'][g][p]:.2f}" if p in s["groups"].get(g, {}) else "-" for g in groups]
            row.append(f"{100 * s['mean'][p]:.2f}" if p in s["mean"] else "-")
            rows.append(row)
        blocks.append(f"{NAMES[p]} top-1 (%)\n" + _grid(head, rows))
    return "\n\n".join(blocks)


def verdict_lines(records: list[dict]) -> list[str]:
    """One line per checkpoint and protocol; the headline one (results.json ``verdict``) marked."""
    out = []
    for r in records:
        for p, v in r.get("verdicts", {}).items():
            lo, hi = v["interval"]
            mark = " (headline)" if r.get("verdict", {}).get("protocol") == p else ""
            out.append(f"verdict ({NAMES[p]}){mark}: {r['name']} vs {v['reference']}: {100 * v['difference']:+.2f} "
                       f"points, 95% interval [{100 * lo:+.2f}, {100 * hi:+.2f}]: {v['word']}")
    return out


def to_csv(records: list[dict], protocols) -> str:
    tasks, groups = _tasks(records), _groups(records)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["name", "path", "protocol"] + [f"{t}_top1" for t in tasks] + [f"{t}_std" for t in tasks]
               + [f"group_{g}" for g in groups] + ["mean", "reference", "difference", "low", "high", "word"])
    for r in records:
        s = r["suite"]
        for p in protocols:
            v = r.get("verdicts", {}).get(p, {})
            w.writerow([r["name"], r["path"], p]
                       + [s["tasks"][t].get(p, {}).get("top1", "") for t in tasks]
                       + [s["tasks"][t].get(p, {}).get("std", "") for t in tasks]
                       + [s["groups"].get(g, {}).get(p, "") for g in groups] + [s["mean"].get(p, "")]
                       + [v.get("reference", ""), v.get("difference", "")]
                       + (list(v["interval"]) if v else ["", ""]) + [v.get("word", "")])
    return buf.getvalue()


def plot(path: Path, records: list[dict], protocol: str) -> None:
    """One bar group per task (and the overall mean), one bar per checkpoint, ± std over draws."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = _tasks(records)
    labels = tasks + ["mean"]
    width = 0.8 / max(1, len(records))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) * max(1, len(records)) ** 0.5 + 2), 4.5))
    x = np.arange(len(labels))
    for i, r in enumerate(records):
        s = r["suite"]
        vals = [100 * s["tasks"][t].get(protocol, {}).get("top1", float("nan")) for t in tasks]
        errs = [100 * s["tasks"][t].get(protocol, {}).get("std", 0.0) for t in tasks]
        vals.append(100 * s["mean"].get(protocol, float("nan")))
        errs.append(0.0)
        ax.bar(x + (i - (len(records) - 1) / 2) * width, vals, width, label=r["name"],
               **({"yerr": errs, "capsize": 2} if any(errs) else {}))
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"test top-1 (%), {NAMES[protocol]}")
    ax.set_title(f"transfer suite: {NAMES[protocol]}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    from selfsup_eval.pictures import save_figure

    save_figure(fig, path)  # temp file, then rename: never a half-written picture


def write(out_dir: str, records: list[dict], protocols, main_protocol: str) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "results.json", out / "suite.csv", out / "suite.png"]
    _atomic_write(files[0], (json.dumps(records, indent=1) + "\n").encode())
    _atomic_write(files[1], to_csv(records, protocols).encode())
    plot(files[2], records, main_protocol)
    return files
