"""Metrics to ``RUN_DIR/metrics.jsonl`` (always) and TensorBoard (when installed)."""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLog:
    """Append-only JSONL, one record per logging step; main process only."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        except Exception:  # tensorboard not installed: JSONL only
            self.tb = None

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3),
                  **{k: (float(f"{v:.7g}") if isinstance(v, float) else v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()
