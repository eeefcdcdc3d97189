"""Experiment trackers through accelerate's tracking API (TensorBoard, W&B, MLflow, Comet, Aim,
ClearML, DVCLive, SwanLab, Trackio: whichever the user installed), for the trainer's metrics and
``selfsup-eval``'s table. The trainer's JSONL is written whatever is asked here; a tracker is an
extra copy, never the only one.

accelerate's tracker classes are used directly rather than through ``Accelerator(log_with=...)``
so that the evaluator, which has no Accelerator of its own, logs the same way. What is added:

* names are checked at start, with one line saying which package to install (a typo or a missing
  package must not surface as a traceback after the first hour of training);
* the configuration is flattened to dotted keys of plain values, which every tracker accepts
  (TensorBoard's hparams refuse lists and nested dicts);
* a resumed run continues the same W&B / MLflow run: their run ids are kept in
  ``RUN_DIR/trackers.json`` and handed back on the next start.

Configuration of the trackers themselves stays theirs: ``WANDB_MODE=offline``, ``WANDB_ENTITY``,
``MLFLOW_TRACKING_URI``, ``COMET_API_KEY``... are read from the environment as usual.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from selfsup_io.errors import TrackerError  # noqa: F401  (also imported from here)


# accelerate's name → the pip package that makes it available
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow (or mlflow-skinny)",
            "comet_ml": "comet_ml", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive",
            "swanlab": "swanlab", "trackio": "trackio"}


def check_trackers(names, key: str = "log.trackers") -> list[str]:
    """The requested tracker names, lower-cased and de-duplicated; raises :class:`TrackerError`
    for a name accelerate does not know or whose package is missing."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    wanted = []
    for name in names or []:
        name = str(name).strip().lower()
        if name in ("", "none", "jsonl"):  # JSONL is always written
            continue
        if name == "all":
            raise TrackerError(f"{key}: list the trackers by name ({', '.join(sorted(PACKAGES))}); "
                               "'all' would start whatever happens to be installed")
        if name not in LOGGER_TYPE_TO_CLASS:
            raise TrackerError(f"{key}: unknown tracker {name!r}; known: "
                               f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))}")
        if name not in {str(t) for t in get_available_trackers()}:
            raise TrackerError(f"{key}: tracker {name!r} is not installed (pip install "
                               f"{PACKAGES.get(name, name)})")
        if name not in wanted:
            wanted.append(name)
    return wanted


def flatten(config, prefix: str = "") -> dict:
    """``{"a": {"b": [1, 2]}}`` → ``{"a.b": "[1, 2]"}``: scalars kept, anything else as text."""
    out = {}
    for key, value in (config or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = value if value is not None else "null"
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


def scalars(values: dict) -> dict:
    """The numeric entries of a metrics record (trackers plot numbers)."""
    return {k: v for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Trackers:
    """The user's trackers for one run; main process only (the caller decides which process).

    ``run_dir`` receives the trackers' local files (TensorBoard events, W&B's offline folder) and
    ``trackers.json`` with the W&B / MLflow run ids, so that a resume logs into the same run.
    """

    def __init__(self, names, run_dir: str | Path, project: str, run_name: str,
                 config: dict | None = None, key: str = "log.trackers"):
        from accelerate import PartialState
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        self.names = check_trackers(names, key)
        self.trackers = []
        if not self.names:
            return
        PartialState()  # accelerate's tracker classes log through its state
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ids_file = self.run_dir / "trackers.json"
        ids = json.loads(self.ids_file.read_text()) if self.ids_file.is_file() else {}
        fresh = []  # trackers whose run starts now: they get the configuration
        for name in self.names:
            if name not in ("wandb", "mlflow") or name not in ids:
                fresh.append(name)
            cls = LOGGER_TYPE_TO_CLASS[name]
            if name == "tensorboard":
                tracker = cls("tensorboard", str(self.run_dir))  # RUN_DIR/tensorboard
            elif name == "wandb":
                ids.setdefault("wandb", uuid.uuid4().hex[:12])
                tracker = cls(project, dir=str(self.run_dir), name=run_name, id=ids["wandb"],
                              resume="allow")
            elif name == "mlflow":
                tracker = cls(project, str(self.run_dir), run_id=ids.get("mlflow"), run_name=run_name)
            elif getattr(cls, "requires_logging_directory", False):
                tracker = cls(project, str(self.run_dir))
            else:
                tracker = cls(project)
            try:
                tracker.start()
            except Exception as e:  # no API key, server unreachable, bad tracking URI...
                self.finish()
                msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise TrackerError(f"{key}: {name} did not start: {msg}") from None
            if name == "mlflow":
                ids["mlflow"] = tracker.active_run.info.run_id
            self.trackers.append(tracker)
        self._save_ids(ids)
        if config:  # a resumed W&B / MLflow run keeps the configuration it started with
            flat = flatten(config)  # (MLflow refuses to change a logged parameter)
            for name, tracker in zip(self.names, self.trackers):
                if name in fresh:
                    tracker.store_init_configuration(flat)

    def _save_ids(self, ids: dict) -> None:
        if not ids:
            return
        tmp = self.ids_file.with_name(f".tmp-{self.ids_file.name}")
        tmp.write_text(json.dumps(ids, indent=1) + "\n")
        os.replace(tmp, self.ids_file)

    def log(self, values: dict, step: int) -> None:
        numbers = scalars(values)
        for tracker in self.trackers:
            tracker.log(numbers, step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
