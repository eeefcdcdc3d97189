"""Suite files (``selfsup-eval suite SUITE.yaml ...``): parsed and checked before any extraction.

A suite file is YAML with one key, ``tasks``, a list of tasks::

    tasks:
      - name: dtd
        group: natural                    # any word; VTAB's are natural / specialized / structured
        train: /data/vtab/dtd/train.json  # shards or index, as --train takes them
        test: /data/vtab/dtd/test.json
        # optional: n_train (1000), val_share (0.2), input_size, augment (finetune: crop+flip)

Why everything is checked here: a suite is many (checkpoint, task) extractions; a typo in the
eleventh task must not surface after ten tasks' worth of GPU time. Every problem is one
:class:`EvalError` line that names the task. Values may use OmegaConf interpolation
(``${oc.env:VTAB_ROOT}``), so one file serves any machine; relative shard paths are read
relative to the suite file's folder, so a suite and its data can move together.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from selfsup_eval.checkpoint import EvalError

TASK_KEYS = ("name", "group", "train", "test", "n_train", "val_share", "input_size", "augment")
AUGMENTS = ("crop+flip", "crop", "none")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Task:
    name: str
    group: str
    train: object  # selfsup_io.shards.ShardSet
    test: object
    n_train: int = 1000
    val_share: float = 0.2
    input_size: int | None = None
    augment: str = "crop+flip"

    @property
    def n_val(self) -> int:
        """Examples of the draw held out to choose hyper-parameters (VTAB: 200 of 1,000)."""
        return max(1, min(self.n_train - 1, round(self.val_share * self.n_train)))


def _read(path: str) -> dict:
    from omegaconf import OmegaConf

    p = Path(path)
    if not p.is_file():
        raise EvalError(f"suite file not found: {path}")
    try:
        raw = OmegaConf.load(p)
        data = OmegaConf.to_container(raw, resolve=True)
    except Exception as e:  # yaml syntax, an unset ${oc.env:...}
        raise EvalError(f"{path}: cannot read the suite file ({' '.join(str(e).split())[:300]})") from None
    if not isinstance(data, dict) or set(data) != {"tasks"} or not isinstance(data["tasks"], list):
        extra = sorted(set(data) - {"tasks"}) if isinstance(data, dict) else []
        why = f"unknown key(s) {', '.join(map(str, extra))}" if extra else "expected a 'tasks' list"
        raise EvalError(f"{path}: {why} (a suite file is 'tasks: [{{name, group, train, test}}, ...]')")
    if not data["tasks"]:
        raise EvalError(f"{path}: the suite has no tasks")
    return data


def _int(value, task: str, key: str, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise EvalError(f"task {task}: {key} {value!r} is not an integer >= {low}")
    return value


def _shards(spec, base: Path, task: str, key: str):
    from selfsup_io.shards import ShardSpecError, resolve_shards

    if not isinstance(spec, str) or not spec.strip():
        raise EvalError(f"task {task}: '{key}' must name shards (an index .json, a folder or a pattern)")
    parts = []
    for part in spec.split("::"):
        part = os.path.expanduser(part.strip())
        is_url = "://" in part or part.startswith("pipe:")
        parts.append(part if is_url or os.path.isabs(part) else str(base / part))
    try:
        return resolve_shards("::".join(parts), ("train",) if key == "train" else ("test", "val"))
    except ShardSpecError as e:
        raise EvalError(f"task {task}: {key}: {' '.join(str(e).split())}") from None


def _labelled(shards, task: str, key: str) -> None:
    from selfsup_eval.data import first_sample

    s = first_sample(shards.urls)
    if s is None:
        raise EvalError(f"task {task}: {key} shards {shards.spec}: cannot read a first sample")
    if s.label is None:
        raise EvalError(f"task {task}: {key} shards {shards.spec} have no labels (sample {s.key} has no "
                        "'cls'): every suite task needs labelled train and test shards")


def load_suite(path: str, check_data: bool = True) -> list[Task]:
    """The checked tasks of a suite file (:class:`EvalError` naming the task on any problem).

    ``check_data``: also resolve the shards, read a first sample of each split for its label and
    compare ``n_train`` with the train split's indexed size (off only in tests of the syntax)."""
    data = _read(path)
    base = Path(path).resolve().parent
    tasks, seen = [], set()
    for i, t in enumerate(data["tasks"]):
        if not isinstance(t, dict):
            raise EvalError(f"{path}: task {i + 1} is not a mapping of name, group, train, test")
        name = t.get("name", f"#{i + 1}")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise EvalError(f"task {name}: name must be letters, digits, '_', '-' or '.' (it names files)")
        unknown = sorted(set(map(str, t)) - set(TASK_KEYS))
        if unknown:
            raise EvalError(f"task {name}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(TASK_KEYS)})")
        missing = [k for k in ("group", "train", "test") if k not in t]
        if missing:
            raise EvalError(f"task {name}: missing {', '.join(missing)}")
        if name in seen:
            raise EvalError(f"task {name}: appears twice in {path}")
        seen.add(name)
        group = t["group"]
        if not isinstance(group, str) or not NAME.fullmatch(group):
            raise EvalError(f"task {name}: group {group!r} must be one word (e.g. natural)")
        n_train = _int(t.get("n_train", 1000), name, "n_train", 2)
        share = t.get("val_share", 0.2)
        if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0 < share < 1:
            raise EvalError(f"task {name}: val_share {share!r} is not a number in (0, 1)")
        size = t.get("input_size")
        if size is not None:
            size = _int(size, name, "input_size", 1)
        augment = t.get("augment", "crop+flip")
        if augment not in AUGMENTS:
            raise EvalError(f"task {name}: augment {augment!r} is not one of {', '.join(AUGMENTS)}")
        train = test = None
        if check_data:
            train, test = _shards(t["train"], base, name, "train"), _shards(t["test"], base, name, "test")
            if train.num_samples is not None and train.num_samples < n_train:
                raise EvalError(f"task {name}: the train split has {train.num_samples} samples, fewer than "
                                f"n_train {n_train} (lower n_train or write a larger split)")
            _labelled(train, name, "train")
            _labelled(test, name, "test")
        tasks.append(Task(name, group, train, test, n_train, float(share), size, augment))
    return tasks
