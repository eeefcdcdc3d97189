"""What an export or a split may make the evaluator allocate, checked before it is allocated.

An export's metadata decides what is built and how large each input is, and a split's labels
decide how many classes the probes allocate for; both come from files a user may not have
written. Before issue 30, a 404-byte safetensors whose metadata asked for a ViT with
``embed_dim 8192, depth 24`` made ``selfsup-eval`` build a ~77 GB model before reading a weight;
a real export at ``input_size`` 2048 asked for 12 GB per extraction batch of 256; one label of
30,000,000 allocated 9.6 GB of class scores. So:

* **The model is the file's size.** The model the metadata describes is first built on PyTorch's
  ``meta`` device (shapes, no storage) and its state dict compared with the tensors the file's
  safetensors header lists: the same names and shapes, or a one-line error and nothing built.
  Since safetensors checks that its header's tensors fill the file, the real model is then at
  most the file's size, plus non-persistent buffers (e.g. a Swin's position index), which may
  add :data:`selfsup_eval.checkpoint.BUFFER_SLACK` elements at most (checked there, on loading).
* **An extraction batch fits a memory budget.** The same ``meta`` model runs one forward pass on a
  ``meta`` input of the export's size, which gives every layer's output shape without computing
  anything; a sample costs its input (uint8 for two batches in flight, three float copies while
  normalising) plus three times the largest layer output. The batch is cut to what fits
  ``SELFSUP_EVAL_BATCH_GB`` (default 4 GB), with one note.
* **Classes are the index's.** A label at or above the index's number of ``class_names`` (or
  :data:`MAX_CLASSES` when the index has none) is a bad label: skipped and counted like an
  unparsable one, never a reason to allocate scores for millions of classes.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

from selfsup_eval.checkpoint import Backbone, EvalError, meta_model  # noqa: F401  (meta_model: also from here)

BATCH_GB_ENV = "SELFSUP_EVAL_BATCH_GB"
DEFAULT_BATCH_GB = 4.0
MAX_CLASSES = 100_000  # without index class_names: more than ImageNet-21k's 21,841 classes


def _max_output(model: nn.Module, x: torch.Tensor, pool: str) -> int:
    """Elements of the largest output of any leaf module in one forward pass of ``x`` (meta)."""
    largest = [0]

    def hook(_module, _inputs, out):
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if torch.is_tensor(t):
                largest[0] = max(largest[0], t.numel())

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model.forward_features(x) if pool == "mean_patch" else model(x)
    finally:
        for h in handles:
            h.remove()
    return largest[0]


def sample_bytes(bb: Backbone, model: nn.Module | None = None) -> int:
    """Estimated extraction memory per sample (see the module docstring); cached on ``bb``."""
    if "sample_bytes" in bb.extra:
        return bb.extra["sample_bytes"]
    c, s = bb.in_chans or 3, bb.input_size or 1
    pixels = c * s * s
    need = pixels * (2 + 3 * 4)  # uint8 in flight twice, three float copies while normalising
    if not bb.is_raw:
        try:
            model = model if model is not None else bb.extra.get("meta_model") or meta_model(bb.meta)
            act = _max_output(model.eval(), torch.empty(1, c, s, s, device="meta"), bb.meta.get("pool", "head"))
        except Exception:  # an op without a meta kernel: a generous guess instead
            act = 16 * pixels
        need += 3 * 4 * max(act, pixels)
    bb.extra["sample_bytes"] = need
    return need


def batch_budget() -> float:
    """Bytes an extraction batch may take (``SELFSUP_EVAL_BATCH_GB``)."""
    raw = os.environ.get(BATCH_GB_ENV)
    try:
        gb = float(raw) if raw else DEFAULT_BATCH_GB
    except ValueError:
        raise EvalError(f"{BATCH_GB_ENV}={raw!r} is not a number of gigabytes") from None
    if not gb > 0:
        raise EvalError(f"{BATCH_GB_ENV}={raw!r} must be positive")
    return gb * 1e9


def extraction_batch(bb: Backbone, requested: int, quiet: bool = False) -> int:
    """``requested``, or fewer samples when that many would pass :func:`batch_budget`."""
    per = sample_bytes(bb)
    fits = max(1, int(batch_budget() // per))
    if fits >= requested:
        return requested
    if not quiet and not bb.extra.get("batch_noted"):  # once per checkpoint, not per split
        bb.extra["batch_noted"] = True
        print(f"note: {bb.name}: extraction batch {fits} instead of {requested}: about "
              f"{per / 1e6:.0f} MB per {bb.input_size}px sample, {batch_budget() / 1e9:g} GB per batch "
              f"({BATCH_GB_ENV})", file=sys.stderr)
    return fits


def class_limit(class_names) -> int:
    """Labels must be below this: the index's class count, else :data:`MAX_CLASSES`."""
    return len(class_names) if class_names else MAX_CLASSES


def drop_out_of_range(feats: dict, limit: int, quiet: bool = False) -> dict:
    """``feats`` without the samples whose label is ``limit`` or more, counted as corrupt (bad
    labels). Runs on keys and labels (every process) and features (rank 0) alike."""
    labels = feats["label"]
    bad = labels >= limit
    if not bool(bad.any()):
        return feats
    keep = ~bad
    keys = [k for k, b in zip(feats["key"], bad.tolist()) if b]
    out = dict(feats)
    out["key"] = [k for k, b in zip(feats["key"], bad.tolist()) if not b]
    out["label"] = labels[keep]
    if feats.get("features") is not None:
        out["features"] = feats["features"][keep]
    out["corrupt"] = feats["corrupt"] + len(keys)
    out["corrupt_keys"] = (list(feats["corrupt_keys"]) + keys)[:5]
    if not quiet:
        print(f"note: {len(keys)} sample(s) have a label beyond the {limit} classes (e.g. {keys[0]}, label "
          f"{int(labels[bad][0])}): skipped as bad labels", file=sys.stderr)
    return out


RAW_SAMPLE = 64  # train images whose headers fix the raw-pixel baseline's default size
RAW_SIZE_CAP = 64  # its largest default side: 3 x 64 x 64 = 12,288 features per image


def raw_shape(urls: list[str]) -> tuple[int, int]:
    """(side, channels) of the raw-pixel baseline without ``--raw-size``: the median shorter side
    of the first :data:`RAW_SAMPLE` readable train images (headers only), at most
    :data:`RAW_SIZE_CAP`; channels of the first. One odd first image (4000 x 3000 once upscaled
    every image to 3000 x 3000: 8.6 GB) no longer decides it."""
    from contextlib import closing

    from selfsup_eval.data import image_info, iter_samples

    sides, channels = [], None
    try:
        with closing(iter_samples(urls)) as samples:
            for s in samples:
                if s.data is None:
                    continue
                try:
                    (w, h), c = image_info(s.data)
                except Exception:  # an undecodable header: the extraction counts it
                    continue
                sides.append(min(w, h))
                channels = channels or c
                if len(sides) == RAW_SAMPLE:
                    break
    except Exception:  # a broken shard is reported by the extraction itself
        pass
    if not sides:
        raise EvalError("raw-pixels: cannot read any of the first train images to fix the raw size "
                        "(pass --raw-size N)")
    sides.sort()
    return max(1, min(sides[(len(sides) - 1) // 2], RAW_SIZE_CAP)), channels
