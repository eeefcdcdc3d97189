"""Exported backbones → eval-mode models, from the public export format only (docs/formats.md).

Why a separate loader and not the trainer's: an exported ``.safetensors`` is the contract between
pretraining and evaluation, so evaluation must work with nothing but timm, torch and safetensors
(any user can do the same). The file's ``selfsup`` metadata says how to rebuild the timm model
(``model_name``, ``model_kwargs``, the ``small_stem`` replacement), how to preprocess
(``input_size``, ``mean``, ``std``, ``in_chans``) and how to pool (``head`` or ``mean_patch``).

The model is put in **eval mode**: BatchNorm uses its running statistics, so a sample's features
do not depend on the rest of its batch (lightly #1444 is what happens otherwise).

``raw-pixels`` is a pseudo-checkpoint: an identity "backbone" whose features are the decoded
pixels in [0, 1], flattened, so the raw-pixel baseline goes through exactly the same decoding,
caching, k-NN and linear code as a real checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from selfsup_io.errors import LoadError
# the export format's readers live with its writer (selfsup_io.export_format); imported here for
# the evaluator's modules, which know them from this module
from selfsup_io.export_format import (FORMAT_VERSION, MAX_INPUT_SIZE, REQUIRED_KEYS, STEP_FILE,  # noqa: F401
                                      build_model, file_digest, has_selfsup_metadata, read_metadata,
                                      validate_metadata)
from selfsup_io.weights import weight_problem

RAW = "raw-pixels"


# A user-fixable problem; the CLI prints it as one line and exits with status 2. The same class
# as the shared readers' (selfsup_io), so a file they refuse is this error too.
EvalError = LoadError


@dataclass
class Backbone:
    """A frozen, eval-mode feature extractor plus what is needed to feed it and to cache it."""

    name: str  # what the table shows, e.g. "dcl@1200"
    path: str  # the checkpoint as given (or "raw-pixels")
    meta: dict  # the export's `selfsup` metadata (synthesised for raw-pixels)
    model: nn.Module | None  # None for raw pixels
    digest: str  # sha256 of the file bytes (raw: of the raw settings): part of the cache key
    extra: dict = field(default_factory=dict)

    @property
    def step(self) -> int:
        try:
            return int(self.meta.get("step", -1))
        except (TypeError, ValueError):
            return -1

    @property
    def is_raw(self) -> bool:
        return self.model is None

    @property
    def in_chans(self) -> int | None:
        """Channels the model takes (raw pixels: the data's own, set by :func:`resolve_raw`)."""
        if self.is_raw:
            return self.meta.get("channels")
        return int(self.meta["model_kwargs"].get("in_chans", 3))

    @property
    def input_size(self) -> int | None:
        size = self.meta.get("input_size")
        return None if size is None else int(size)

    def to(self, device) -> "Backbone":
        if self.model is not None:
            self.model.to(device)
        return self

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features of a normalised batch ``x`` (B, C, H, W), per the export's ``pool``."""
        if self.model is None:
            return x.flatten(1)
        if self.meta.get("pool", "head") == "mean_patch":
            tokens = self.model.forward_features(x)
            if tokens.ndim != 3:
                raise EvalError(f"{self.path}: pool 'mean_patch' needs token features (B, N, C) from "
                                f"forward_features, got shape {tuple(tokens.shape)}")
            return tokens[:, int(getattr(self.model, "num_prefix_tokens", 0)):].mean(1)
        return self.model(x)


BUFFER_SLACK = 1 << 24  # elements (64 MB fp32) of buffers a model may hold beyond its file's tensors


def meta_model(meta: dict) -> nn.Module:
    """The model ``meta`` describes, on the ``meta`` device: shapes only, nothing allocated."""
    with torch.device("meta"):
        return build_model(meta)


def file_shapes(path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape, from the safetensors header (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _elements(shapes) -> int:
    total = 0
    for shape in shapes:
        n = 1
        for d in shape:
            n *= int(d)
        total += n
    return total


def check_tensors(path, meta: dict) -> nn.Module:
    """Raise :class:`EvalError` unless the file's tensors are exactly the described model's
    state dict (names and shapes) and the model holds no more than :data:`BUFFER_SLACK` elements
    beyond them; return the ``meta`` model (for :func:`sample_bytes`)."""
    model = meta_model(meta)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        have = file_shapes(path)
    except Exception as e:
        raise EvalError(f"{path}: cannot read its safetensors header ({' '.join(str(e).split())[:200]})") from None
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    wrong = [f"{k} {list(have[k])} (the model's is {list(want[k])})" for k in sorted(set(want) & set(have))
             if want[k] != have[k]]
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing, e.g. {', '.join(missing[:3])}" if missing else "",
                 f"{len(unexpected)} unexpected, e.g. {', '.join(unexpected[:3])}" if unexpected else "",
                 f"{len(wrong)} of another shape, e.g. {'; '.join(wrong[:2])}" if wrong else ""]
        raise EvalError(f"{path}: weights do not fit {meta['model_name']} as its metadata describes it "
                        f"({'; '.join(p for p in parts if p)}); nothing was built")
    held = _elements(t.shape for t in [*model.parameters(), *model.buffers()])
    stored = _elements(have.values())
    if held > stored + BUFFER_SLACK:
        raise EvalError(f"{path}: {meta['model_name']} as its metadata describes it holds {held:,} values, "
                        f"{held - stored:,} more than the file's tensors; nothing was built")
    return model


def load_backbone(path: str, raw_size: int | None = None) -> Backbone:
    """Export file (or ``raw-pixels``) → eval-mode :class:`Backbone`; one-line errors."""
    if path == RAW:
        return raw_backbone(raw_size)
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise EvalError(f"checkpoint not found: {path}")
    meta = read_metadata(p)
    shell = check_tensors(p, meta)  # the file's tensors are the model described, before building it
    model = build_model(meta)
    try:
        weights = load_file(str(p))
        if (why := weight_problem(weights, model.state_dict())) is not None:
            raise EvalError(f"{path}: {why}: refusing to evaluate it")
        model.load_state_dict(weights)
    except RuntimeError as e:
        reason = " ".join(str(e).split())
        raise EvalError(f"{path}: weights do not fit {meta['model_name']} "
                        f"({reason[:300]}{'...' if len(reason) > 300 else ''})") from None
    model.eval()  # BatchNorm uses its running statistics (lightly #1444)
    model.requires_grad_(False)
    bb = Backbone(f"{run_name(p)}@{meta.get('step', '?')}", str(path), meta, model, file_digest(p),
                  {"meta_model": shell})  # shapes only: sizes the extraction batch (budgets.py)
    check_feature_dim(bb)
    return bb


def check_feature_dim(bb: Backbone) -> None:
    """One forward of a blank image: a wrong ``pool``/``feature_dim`` fails here, not mid-run."""
    expected = bb.meta.get("feature_dim")
    size = bb.input_size
    x = torch.zeros(1, bb.in_chans, size, size)
    try:
        dim = bb.features(x).shape[-1]
    except EvalError:
        raise
    except Exception as e:
        raise EvalError(f"{bb.path}: the model fails on a {size}x{size} input ({e})") from None
    if expected is not None and int(expected) != dim:
        raise EvalError(f"{bb.path}: metadata says feature_dim {expected} but the {bb.meta.get('pool', 'head')} "
                        f"features have {dim} dimensions")
    bb.meta.setdefault("feature_dim", dim)


def raw_backbone(raw_size: int | None) -> Backbone:
    """The checkpoint-free baseline. Channels and, without ``--raw-size``, the size come from
    the train split (:func:`selfsup_eval.budgets.raw_shape`, then :func:`resolve_raw`), so train
    and val features match."""
    meta = {"model_name": None, "input_size": raw_size, "objective": "none", "step": 0,
            "pool": "pixels", "channels": None}
    return Backbone(RAW, RAW, meta, None, "")


def resolve_raw(bb: Backbone, size: tuple[int, int], channels: int) -> None:
    """Fix the raw baseline's transform from a (W, H) size (its shorter side, unless
    ``--raw-size`` gave one) and the channel count."""
    if bb.meta.get("input_size") is None:
        w, h = size
        bb.meta["input_size"] = min(w, h)
    bb.meta["channels"] = channels
    bb.meta["mean"], bb.meta["std"] = [0.0] * channels, [1.0] * channels  # pixels in [0, 1]
    blob = json.dumps({"raw": 1, "size": bb.meta["input_size"], "channels": channels})
    bb.digest = hashlib.sha256(blob.encode()).hexdigest()


def run_name(p: Path) -> str:
    return p.parent.parent.name if p.parent.name == "export" else p.stem


def run_dir_of(path: str) -> str | None:
    """The run directory an export belongs to (groups curves in accuracy_vs_step.png)."""
    if path == RAW:
        return None
    p = Path(path)
    return str(p.parent.parent) if p.parent.name == "export" else str(p.parent)


def _step_of(f: Path) -> int:
    m = STEP_FILE.fullmatch(f.name)
    return int(m.group(1)) if m else -1


def expand_checkpoints(items: list[str]) -> list[str]:
    """Files stay as given; a run directory becomes its ``export/backbone-step*.safetensors``
    ordered by step, or its ``export/backbone.safetensors`` when it has no per-step exports."""
    out = []
    for item in items:
        p = Path(item)
        if item == RAW or p.is_file():
            out.append(item)
        elif p.is_dir():
            export = p / "export" if (p / "export").is_dir() else p
            steps = sorted((f for f in export.glob("backbone-step*.safetensors") if _step_of(f) >= 0),
                           key=_step_of)
            found = steps or [f for f in [export / "backbone.safetensors"] if f.is_file()]
            if not found:
                raise EvalError(f"{item} holds no exported checkpoint (expected "
                                f"{export}/backbone-step*.safetensors or backbone.safetensors)")
            out.extend(str(f) for f in found)
        else:
            raise EvalError(f"checkpoint not found: {item}")
    return out
