"""Metrics to ``RUN_DIR/metrics.jsonl`` (always) and to the trackers the recipe names
(``log.trackers``: tensorboard, wandb, mlflow... through accelerate's tracking API, see
:mod:`selfsup_io.tracking`). JSONL is the record of truth: the tests, ``bench/`` and the README's
figures read it, and it needs nothing installed."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from selfsup_io.tracking import Trackers


def _value(v):
    """7 significant digits; a non-finite float (a metric undefined this step, e.g. a share of
    nothing) becomes null: ``NaN`` is not JSON, and strict readers (jq, JavaScript) reject the line."""
    if isinstance(v, float):
        return float(f"{v:.7g}") if math.isfinite(v) else None
    return v


def truncate_after(path: Path, step: int) -> None:
    """Drop the records of steps after ``step`` (and a line torn by a kill) from ``path``. A run
    resumed from the checkpoint of ``step`` computes the later steps again; kept, they would
    appear twice, with the first run's values, in every reader of the file."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)

    def keep(line: str) -> bool:
        try:
            return line.endswith("\n") and int(json.loads(line)["step"]) <= step
        except (ValueError, KeyError, TypeError):
            return False

    kept = [line for line in lines if keep(line)]
    if len(kept) == len(lines):
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


class MetricsLog:
    """Append-only JSONL, one record per logging step, copied to the trackers; main process only.

    ``config`` (the resolved recipe) becomes the trackers' run configuration.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, trackers=(),
                 project: str = "selfsup", config: dict | None = None, step: int | None = None):
        self.enabled = enabled
        self.trackers = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        self.path = run_dir / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if step is not None:
            truncate_after(self.path, step)
        self.file = open(self.path, "a", buffering=1)
        try:
            self.trackers = Trackers(trackers, run_dir, project, run_dir.resolve().name, config)
        except BaseException:
            self.file.close()
            raise

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **{k: _value(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record, allow_nan=False) + "\n")
        self.trackers.log({k: v for k, v in record.items() if k not in ("step", "time") and v is not None}, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.trackers.finish()
