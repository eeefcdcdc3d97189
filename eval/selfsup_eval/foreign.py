"""Checkpoints from the rest of the ecosystem → the timm model ``--model`` names.

Users compare their runs with public checkpoints and other frameworks' runs, which store a
backbone in many layouts. Like DINO's eval scripts (``--checkpoint_key``, then stripping
``module.`` and ``backbone.``), the loader finds the weights in two steps, each overridable:

1. **which state dict** (``--checkpoint-key``): the file itself when it is a flat name → tensor
   map, else the first of :data:`STATE_KEYS` that holds one (``state_dict``: timm, torchvision
   references, official MoCo, solo-learn and other Lightning checkpoints; ``teacher``: DINO;
   ``target_encoder``: I-JEPA, whose evaluations use the target encoder; ``encoder``...), else
   the only one there is;
2. **which prefix** (``--prefix``): the one that maps the most checkpoint names, with matching
   shapes, onto the model's names, ties broken by :data:`PREFERRED` (the query encoder
   ``module.encoder_q.`` over MoCo's key encoder, ``backbone.`` over ``momentum_backbone.``...);
   a tie it does not break (BYOL's ``online_network.`` and ``target_network.``) is a one-line
   error naming the prefixes, never a guess;
   A name may also address the model's children by position, as lightly's examples do with
   ``nn.Sequential(*list(resnet.children())[:-1])`` (``backbone.4.0.conv1.weight`` is
   ``layer1.0.conv1.weight``); that reading is tried too.

Checkpoint names left over (heads, projectors, the other encoder, optimizer-free extras) are
reported in one line. A model weight the checkpoint does not provide is an error, never a
silently random backbone. The detection is :mod:`selfsup_io.layouts` (shared with the trainer's
``model.init``); files are read by :mod:`selfsup_io.safe_load` only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from torch import nn

from selfsup_eval.checkpoint import (FORMAT_VERSION, Backbone, EvalError, check_feature_dim, file_digest,
                                     validate_metadata)
from selfsup_io.layouts import load_weights, pick_state_dict, unused_note
from selfsup_io.safe_load import load_file

def build_timm(model_name: str, model_kwargs: dict | None, where: str) -> tuple[nn.Module, dict]:
    import timm

    if not isinstance(model_name, str) or not timm.is_model(model_name):
        raise EvalError(f"--model {model_name!r} is not a timm model name (see timm.list_models())")
    kwargs = {**(model_kwargs or {}), "num_classes": 0}
    try:
        return timm.create_model(model_name, pretrained=False, **kwargs), kwargs  # never a download
    except Exception as e:
        raise EvalError(f"{where}: timm cannot build {model_name!r} with {kwargs} ({' '.join(str(e).split())[:200]})") from None


def foreign_metadata(model: nn.Module, model_name: str, kwargs: dict, input_size=None, mean=None,
                     std=None) -> dict:
    """Export-style metadata; input size, mean and std from timm's pretrained config of the model
    unless given (no network: the config ships with timm)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = input_size if input_size is not None else int((cfg.get("input_size") or (3, 224, 224))[-1])
    return {"format": FORMAT_VERSION, "model_name": model_name, "model_kwargs": kwargs, "small_stem": False,
            "input_size": size, "mean": [float(v) for v in (mean or cfg.get("mean") or (0.485, 0.456, 0.406))],
            "std": [float(v) for v in (std or cfg.get("std") or (0.229, 0.224, 0.225))],
            "feature_dim": int(getattr(model, "num_features", 0)) or None, "pool": "head"}


def load_foreign(path: str, model_name: str, model_kwargs: dict | None = None, key: str | None = None,
                 prefix: str | None = None, input_size: int | None = None, mean=None, std=None,
                 ) -> tuple[Backbone, str]:
    """A non-selfsup checkpoint as an eval-mode :class:`Backbone`, plus the one-line key report."""
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"checkpoint not found: {path}")
    obj, how = load_file(str(p))
    state, used_key = pick_state_dict(obj, key, str(p))
    model, kwargs = build_timm(model_name, model_kwargs, str(p))
    meta = foreign_metadata(model, model_name, kwargs, input_size, mean, std)
    validate_metadata(meta, f"{p} with --model {model_name}")
    m = load_weights(model, state, str(p), prefix)
    model.eval()
    model.requires_grad_(False)
    epoch = obj.get("epoch") if isinstance(obj, dict) else None
    meta.update(objective="foreign", step=int(epoch) if isinstance(epoch, int) else -1,
                source={"file": str(p), "read_with": how, "checkpoint_key": used_key, "prefix": m["prefix"]})
    options = json.dumps({k: meta[k] for k in ("model_name", "model_kwargs", "input_size", "mean", "std")}
                         | {"key": used_key, "prefix": m["prefix"], "positional": m["positional"]}, sort_keys=True)
    digest = hashlib.sha256((file_digest(p) + options).encode()).hexdigest()
    bb = Backbone(f"{p.stem}[{model_name}]", str(p), meta, model, digest)
    check_feature_dim(bb)
    return bb, unused_note(str(p), m, used_key)
