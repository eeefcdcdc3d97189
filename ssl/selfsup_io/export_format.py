"""The export format (docs/formats.md, exported backbone): one owner for its writer and readers.

An export is a safetensors file of a timm backbone's state dict whose metadata key ``selfsup``
holds JSON saying how to rebuild the model (``model_name``, ``model_kwargs``, ``small_stem``), how
to preprocess (``input_size``, ``mean``, ``std``) and how to pool (``pool``). The trainer writes it
(:func:`write_export`), ``selfsup-export`` writes it for any checkpoint, and the evaluator reads it
(:func:`read_metadata`, :func:`build_model`); they all import this module, as timm keeps saving and
loading together in ``_hub.py``, so the format cannot drift between a writer and a reader.

The names inside a run directory that other tools read are here too: ``checkpoints/step-N`` with
its ``trainer.json`` (step, and the ``export`` record: which prefix of the objective's state dict
is the exported backbone and how it is pooled, written by the trainer so that ``selfsup-export``
need not know any objective), the model weights accelerate saves, and ``export/backbone*.safetensors``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

from torch import nn

from selfsup_io.errors import LoadError

FORMAT_VERSION = 1
REQUIRED_KEYS = ("model_name", "model_kwargs", "input_size", "mean", "std")
MAX_INPUT_SIZE = 2048  # the largest square input an export may ask for (3 x 2048^2 fp32 = 50 MB)
STEP_FILE = re.compile(r"backbone-step(\d+)\.safetensors")

EXPORT_DIR = "export"
LATEST_EXPORT = "backbone.safetensors"
BEST_EXPORT = "backbone-best.safetensors"  # checkpoint.keep_best: the export with the best monitor k-NN
CHECKPOINTS_DIR = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d{9})$")
TRAINER_FILE = "trainer.json"
MODEL_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # what accelerate's save_state writes
POOLS = ("head", "mean_patch")


def step_export_name(step: int) -> str:
    return f"backbone-step{step:09d}.safetensors"


def latest_checkpoint(run: str | Path) -> Path | None:
    """The newest complete ``checkpoints/step-N`` of a run (one with its ``trainer.json``)."""
    root = Path(run) / CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    found = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / TRAINER_FILE).is_file())
    return found[-1] if found else None


def export_bytes(state_dict: dict, metadata: dict) -> bytes:
    """The export file's bytes: the tensors (on the CPU, contiguous) and ``metadata`` as the
    ``selfsup`` JSON, with this version's ``format`` number."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    return save(tensors, metadata={"selfsup": json.dumps({**metadata, "format": FORMAT_VERSION})})


def write_export(state_dict: dict, metadata: dict, out: str | Path, check: bool = False,
                 data: bytes | None = None) -> Path:
    """Write an export atomically: a temp name in the same folder, then renamed, so nothing
    half-written ever has the export's name. ``open()`` follows the umask (safetensors'
    ``save_file`` makes 0600 files other users cannot read). ``check``: read the metadata back
    through :func:`read_metadata` before the file takes its name. ``data``: bytes already made by
    :func:`export_bytes` (several names, one serialisation). Errors propagate; the temp is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = export_bytes(state_dict, metadata) if data is None else data
    tmp = out.with_name(f".tmp-{out.name}.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if check:
            read_metadata(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def has_selfsup_metadata(path) -> bool:
    """True for a readable safetensors file whose header has the ``selfsup`` key (no weights read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return "selfsup" in (f.metadata() or {})
    except Exception:
        return False


def read_metadata(path: Path) -> dict:
    """The export's ``selfsup`` metadata, checked; :class:`LoadError` if it is not an export."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for non-safetensors bytes
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LoadError(f"{path} is not a readable safetensors file ({reason}); a checkpoint of another "
                        "framework needs --model TIMM_NAME") from None
    if "selfsup" not in meta:
        raise LoadError(f"{path} has no 'selfsup' metadata: not a selfsup export "
                        "(expected RUN/export/backbone*.safetensors, see docs/formats.md); for another "
                        "framework's checkpoint pass --model TIMM_NAME")
    try:
        info = json.loads(meta["selfsup"])
    except ValueError:
        raise LoadError(f"{path}: its 'selfsup' metadata is not JSON") from None
    if not isinstance(info, dict):
        raise LoadError(f"{path}: its 'selfsup' metadata is not a JSON object (see docs/formats.md)")
    missing = [k for k in REQUIRED_KEYS if k not in info]
    if missing:
        raise LoadError(f"{path}: 'selfsup' metadata lacks {', '.join(missing)} "
                        "(see docs/formats.md, exported backbone)")
    validate_metadata(info, str(path))
    return info


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_metadata(info: dict, where: str) -> None:
    """Every value a loader acts on, checked for type and range BEFORE anything is built.

    Why: the metadata decides what is allocated. ``input_size: 60000`` made the feature-size probe
    allocate a 3 x 60000 x 60000 image (43 GB) and ``model_kwargs: 5`` ended in a TypeError
    traceback; a damaged or hand-edited export must give one line instead (issue #16)."""
    def bad(key, why):
        raise LoadError(f"{where}: export metadata {key} {info.get(key)!r} {why} (docs/formats.md)")

    fmt = info.get("format", 1)
    if not _is_int(fmt) or fmt < 1:
        bad("format", "is not a positive integer")
    if fmt > FORMAT_VERSION:
        raise LoadError(f"{where}: export format {fmt} is newer than this selfsup-eval reads "
                        f"({FORMAT_VERSION}); upgrade selfsup")
    if not isinstance(info["model_name"], str) or not info["model_name"].strip():
        bad("model_name", "is not a timm model name")
    import timm

    if not timm.is_model(info["model_name"]):  # hf-hub:NAME would fetch its config from the network
        bad("model_name", f"is not a model of timm {timm.__version__} (hub names such as hf-hub:... are "
            "refused: nothing is downloaded at run time)")
    kwargs = info["model_kwargs"]
    if not isinstance(kwargs, dict):
        bad("model_kwargs", "is not a JSON object of timm.create_model keyword arguments")
    in_chans = kwargs.get("in_chans", 3)
    if in_chans not in (1, 3) or not _is_int(in_chans):
        raise LoadError(f"{where}: export metadata model_kwargs.in_chans {in_chans!r}: selfsup-eval "
                        "feeds 1-channel (grayscale) or 3-channel (RGB) images")
    size = info["input_size"]
    if not _is_int(size) or not 1 <= size <= MAX_INPUT_SIZE:
        bad("input_size", f"is not an integer side in 1..{MAX_INPUT_SIZE}")
    for key in ("mean", "std"):
        v = info[key]
        if not isinstance(v, list) or len(v) not in (1, 3, in_chans) or not all(map(_is_number, v)):
            bad(key, f"is not a list of 1 or {in_chans} finite numbers")
        if key == "std" and min(v) <= 0:
            bad(key, "has a value that is not positive")
    if info.get("pool", "head") not in POOLS:
        raise LoadError(f"{where}: unknown pool {info['pool']!r} (expected 'head' or 'mean_patch')")
    dim = info.get("feature_dim")
    if dim is not None and (not _is_int(dim) or dim < 1):
        bad("feature_dim", "is not a positive integer")
    if not isinstance(info.get("small_stem", False), bool):
        bad("small_stem", "is not true or false")


def file_digest(path: Path) -> str:
    """sha256 of the file bytes: a rewritten export at the same path gets a new cache key."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def build_model(meta: dict) -> nn.Module:
    """Plain ``timm.create_model`` plus the ``small_stem`` replacement of formats.md."""
    import timm

    kwargs = dict(meta["model_kwargs"])
    kwargs["num_classes"] = 0
    try:
        model = timm.create_model(meta["model_name"], pretrained=False, **kwargs)
    except Exception as e:  # unknown model name, bad kwargs
        raise LoadError(f"timm cannot build {meta['model_name']!r} with {kwargs} ({e})") from None
    if meta.get("small_stem"):
        if not (hasattr(model, "conv1") and hasattr(model, "bn1")):
            raise LoadError(f"small_stem is set but {meta['model_name']} has no ResNet stem (conv1/bn1)")
        in_chans = int(kwargs.get("in_chans", 3))
        model.conv1 = nn.Conv2d(in_chans, model.bn1.num_features, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    return model
