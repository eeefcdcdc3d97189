"""``DIR/report.html``: one page that opens from disk, with no network and no server.

It shows the protocol line, the results table (k-NN, linear, k-NN ⊕ linear, retrieval), the
low-shot table, the transfer suite's table and verdict when the records hold ``suite`` results,
and every picture with a one-line caption. Pictures are referenced as relative file names next
to the page (``neighbours.png``), so the folder can be copied or zipped as a whole; nothing is
fetched from anywhere (no scripts, fonts or style sheets outside the page).

:func:`render` takes the records (what ``results.json`` holds), so a later command, e.g. the
suite, can write the page again from its own records with :func:`write_report`.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

from selfsup_eval.report import lowshot_rows, table_rows

#: captions of the pictures every ``--out`` may hold, when the drawer did not give one
CAPTIONS = {
    "accuracy_vs_step.png": "Val top-1 against training step for every run with several checkpoints; "
                            "dashed lines: the baselines' k-NN.",
    "neighbours.png": "One val query per class and its nearest train images; red: another label.",
    "map.png": "2-D map of the val features, coloured by label.",
    "confusion.png": "The linear probe's confusion matrix on val, rows normalised.",
    "curves.png": "Training curves from the run's metrics.jsonl.",
    "suite.png": "Transfer suite: one bar group per task.",
}

STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}
th,td{border:1px solid #bbb;padding:3px 7px;text-align:right}th{background:#eee}
td:first-child,th:first-child{text-align:left}.protocol{font-size:12px;color:#555}
figure{margin:1em 0 2em}img{max-width:100%;border:1px solid #ddd}figcaption{font-size:13px;color:#333}
.verdict{font-weight:bold}"""


def _e(x) -> str:
    return html.escape(str(x))


def _table(head: list[str], rows: list[list[str]], cls: str) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _pct(x) -> str:
    if isinstance(x, dict):
        x = x.get("top1")
    return "-" if not isinstance(x, (int, float)) else f"{100 * x:.2f}"


SUITE_METHODS = ("knn", "linear", "knn_linear", "finetune")


def suite_section(records: list[dict]) -> str:
    """Per checkpoint with ``suite``: tasks × protocols top-1, group means, mean; the verdict."""
    parts = []
    for r in records:
        suite = r.get("suite")
        if not isinstance(suite, dict):
            continue
        tasks = suite.get("tasks") or {}
        methods = [m for m in SUITE_METHODS if any(m in t for t in tasks.values())]
        head = ["task", "group", "train", "test"] + [f"{m} top1" for m in methods]
        rows = [[name, t.get("group", "-"), t.get("n_train", "-"), t.get("n_test", "-")]
                + [_pct(t.get(m)) for m in methods] for name, t in tasks.items()]
        for group, mean in (suite.get("groups") or {}).items():
            rows.append([f"mean: {group}", "", "", ""] + _means(mean, methods))
        if "mean" in suite:
            rows.append(["mean", "", "", ""] + _means(suite["mean"], methods))
        parts.append(f"<h3>{_e(r.get('name', '?'))}</h3>" + _table(head, rows, "suite"))
        v = r.get("verdict")
        if isinstance(v, dict):
            lo, hi = (list(v.get("interval") or [None, None]) + [None, None])[:2]
            parts.append(f'<p class="verdict">verdict against {_e(v.get("reference"))}: '
                         f'{_e(v.get("word"))} (difference {_pp(v.get("difference"))}, 95 % interval '
                         f'[{_pp(lo)}, {_pp(hi)}] points)</p>')
    return "<h2>Transfer suite</h2>" + "".join(parts) if parts else ""


def _means(mean, methods) -> list[str]:
    """A group mean: one number (under every protocol column) or ``{protocol: number}``."""
    if isinstance(mean, dict):
        return [_pct(mean.get(m)) for m in methods]
    return [_pct(mean)] + [""] * (len(methods) - 1) if methods else []


def _pp(x) -> str:
    return "-" if not isinstance(x, (int, float)) else f"{100 * x:+.2f}"


def render(records: list[dict], protocol: str = "", pictures=(), title: str = "selfsup-eval report") -> str:
    """The page. ``pictures``: ``[(file name, caption)]`` or file names (captions from
    :data:`CAPTIONS`), relative to the page's folder."""
    out = [f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
           f"<style>{STYLE}</style></head><body><h1>{_e(title)}</h1>"]
    if protocol:
        out.append(f'<p class="protocol">{_e(protocol)}</p>')
    out.append("<h2>Results</h2><p>Top-1/top-5 accuracy and retrieval (recall@k: a same-label train "
               "image among the k nearest; mAP@R, R capped at 1000) on val, in percent.</p>")
    out.append(_table(*table_rows(records), "results"))
    low = lowshot_rows(records)
    if low:
        out.append("<h2>Low-shot</h2>" + _table(*low, "lowshot"))
    out.append(suite_section(records))
    seen = set()
    for p in pictures:
        name, caption = (p, CAPTIONS.get(p, "")) if isinstance(p, str) else p
        if name in seen:
            continue
        seen.add(name)
        out.append(f'<figure><img src="{_e(name)}" alt="{_e(name)}"><figcaption>{_e(caption)}'
                   "</figcaption></figure>")
    out.append("</body></html>\n")
    return "\n".join(out)


def write_report(out_dir, records: list[dict], protocol: str = "", extra_pictures=()) -> Path:
    """Write ``DIR/report.html`` (temporary name, then rename) showing ``extra_pictures`` (names
    or ``(name, caption)``) that exist in ``out_dir``, plus ``suite.png`` when present."""
    out = Path(out_dir)
    pics = [p for p in list(extra_pictures) + ["suite.png"]
            if (out / (p if isinstance(p, str) else p[0])).is_file()]
    order = {n: i for i, n in enumerate(("neighbours.png", "map.png", "confusion.png", "curves.png"))}
    pics.sort(key=lambda p: order.get(p if isinstance(p, str) else p[0], 9))  # the first look first
    path = out / "report.html"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(render(records, protocol, pics))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
