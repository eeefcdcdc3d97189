"""Exported backbones → eval-mode models, from the public export format only (docs/formats.md).

Nothing here imports the trainer: a checkpoint is a safetensors file whose ``selfsup`` metadata
says how to rebuild the timm model, how to preprocess and how to pool.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

RAW = "raw-pixels"


class EvalError(ValueError):
    """A user-fixable problem, printed as one line."""


@dataclass
class Backbone:
    name: str  # what the table shows
    path: str
    meta: dict
    model: nn.Module | None  # None for raw pixels
    digest: str  # content hash, part of the feature-cache key

    @property
    def step(self) -> int:
        return int(self.meta.get("step", -1))

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.model is None:
            return x.flatten(1)
        if self.meta.get("pool", "head") == "mean_patch":
            tokens = self.model.forward_features(x)
            return tokens[:, getattr(self.model, "num_prefix_tokens", 0):].mean(1)
        return self.model(x)


def read_metadata(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise EvalError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    if "selfsup" not in meta:
        raise EvalError(f"{path} has no 'selfsup' metadata: not a selfsup export "
                        "(export/backbone*.safetensors of a run)")
    return json.loads(meta["selfsup"])


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:32]


def load_backbone(path: str, raw_size: int | None = None) -> Backbone:
    if path == RAW:
        meta = {"input_size": raw_size, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0],
                "objective": "none", "step": 0, "pool": "pixels"}
        return Backbone(RAW, RAW, meta, None, f"raw-{raw_size}")
    import timm
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise EvalError(f"checkpoint not found: {path}")
    meta = read_metadata(p)
    model = timm.create_model(meta["model_name"], pretrained=False, **meta["model_kwargs"])
    if meta.get("small_stem"):
        in_chans = meta["model_kwargs"].get("in_chans", 3)
        model.conv1 = nn.Conv2d(in_chans, model.bn1.num_features, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    try:
        model.load_state_dict(load_file(str(p)))
    except RuntimeError as e:
        raise EvalError(f"{path}: weights do not fit {meta['model_name']} ({str(e).splitlines()[0]})") from None
    model.eval()  # BatchNorm uses its running statistics (lightly #1444)
    run = p.parent.parent.name if p.parent.name == "export" else p.stem
    return Backbone(f"{run}@{meta.get('step', '?')}", str(p), meta, model, file_digest(p))


def expand_checkpoints(items: list[str]) -> list[str]:
    """Files stay; a run directory becomes its per-step exports, ordered by step."""
    out = []
    for item in items:
        p = Path(item)
        if item == RAW or p.is_file():
            out.append(item)
        elif p.is_dir():
            export = p / "export" if (p / "export").is_dir() else p
            steps = sorted(export.glob("backbone-step*.safetensors"),
                           key=lambda f: int(re.sub(r"\D", "", f.stem) or 0))
            found = steps or sorted(export.glob("backbone.safetensors"))
            if not found:
                raise EvalError(f"{item} holds no exported checkpoint (export/backbone*.safetensors)")
            out.extend(str(f) for f in found)
        else:
            raise EvalError(f"checkpoint not found: {item}")
    return out
