"""``--baseline init``: the weights a run started from (``model.init``), evaluated next to its
checkpoints, so the table answers "better than where I started?" directly.

The trainer records the starting file in every export's metadata (``init: {source, sha256,
checkpoint_key, prefix}``). ``init`` among the baselines is replaced by each distinct starting
file of the CHECKPOINT arguments' exports, read exactly as the run read it (the same key and
prefix, through :mod:`selfsup_io.layouts`) and preprocessed as the run's exports are (its model,
input size, mean and std), unless the file is itself a selfsup export, which carries its own.
A starting file that is gone, or whose bytes changed since the run read them, is a one-line
error: a baseline that is not the run's start would answer the question wrongly.
"""

from __future__ import annotations

from pathlib import Path

from selfsup_eval.checkpoint import EvalError, expand_checkpoints, has_selfsup_metadata, load_backbone, read_metadata
from selfsup_eval.foreign import load_foreign
from selfsup_io.export_format import file_digest

INIT = "init"


def expand_baselines(baselines: list[str], checkpoints: list[str]) -> tuple[list[str], dict]:
    """``(baselines with init replaced by the starting files, {file: how to load it})``."""
    if INIT not in baselines:
        return list(baselines), {}
    specs: dict = {}
    for path in expand_checkpoints(checkpoints):
        if not has_selfsup_metadata(path):
            continue  # another framework's file has no start to compare with
        meta = read_metadata(Path(path))
        init = meta.get("init")
        if not isinstance(init, dict) or not init.get("source"):
            continue
        specs.setdefault(str(init["source"]), {**init, "meta": meta, "export": path})
    if not specs:
        raise EvalError("--baseline init: none of the checkpoints records a starting file (their runs "
                        "started from random weights, model.init=random, or predate the record)")
    for source, spec in specs.items():
        if not Path(source).is_file():
            raise EvalError(f"--baseline init: the starting weights of {spec['export']}, {source}, are no "
                            "longer there (restore the file, or drop --baseline init)")
        if spec.get("sha256") and file_digest(Path(source)) != spec["sha256"]:
            raise EvalError(f"--baseline init: {source} changed since the run started from it (sha256 "
                            f"differs from the export's record): not the run's starting weights")
    out = []
    for item in baselines:
        out.extend(specs) if item == INIT else out.append(item)
    return out, specs


def load_init(path: str, spec: dict):
    """The starting file as a :class:`~selfsup_eval.checkpoint.Backbone` named ``init:FILE``."""
    if has_selfsup_metadata(path):
        bb = load_backbone(path)
        bb.name = f"init:{Path(path).name}"
        bb.meta["step"] = 0  # the start of the runs that name it, not the step it had in its own run
        return bb, f"{path}: a selfsup export, read with its own metadata"
    m = spec["meta"]
    kwargs = {k: v for k, v in (m.get("model_kwargs") or {}).items() if k != "num_classes"}
    bb, note = load_foreign(path, m["model_name"], kwargs, spec.get("checkpoint_key"), spec.get("prefix"),
                            m["input_size"], m["mean"], m["std"])
    bb.name = f"init:{Path(path).name}"
    bb.meta["step"] = 0
    return bb, note
