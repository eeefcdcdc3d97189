"""Where every view's crop comes from: boxes drawn over the whole original image.

SimCLR, MoCo (v2), DCL, MoCHi, the Hallucinator, I-JEPA and JigClu all cut their crops with
torchvision's ``RandomResizedCrop`` applied to the *decoded original* image: the box is drawn by
``RandomResizedCrop.get_params(img, scale, ratio)`` on the original height and width, so the
borders of a non-square photo are seen and a small-scale crop keeps the original pixels. selfsup
draws the same boxes (:func:`crop_box`) from the image's header size before decoding, so the
decoder can decode only as much resolution as the boxes need (:mod:`selfsup.decode`).

An objective states its views as a list of :class:`ViewSpec` (``Objective.views``): two
``RandomResizedCrop(size, scale, ratio)`` views for the contrastive methods, one for I-JEPA, and
for JigClu one crop inside each of the image's four overlapping quadrants (the official
``JigCluTransform`` cuts the quadrants from the original image, then crops every quadrant with
``RandomResizedCrop(112)``). A ``random=False`` view is the deterministic centre square (shorter
side resized to ``size``, centre crop), used by the online k-NN monitor.

Boxes of one sample come from a generator seeded by the sample's place in the stream (see
:func:`sample_rng`), so they do not depend on which worker decodes it, a resumed run
redraws the same boxes, and the CPU and the device decode paths cut identical crops.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ViewSpec:
    """One view: a ``size``² crop with ``RandomResizedCrop(scale, ratio)`` box statistics over
    the whole image, or over quadrant ``quadrant`` (0-3: top-left, bottom-left, top-right, bottom-right, the official order) reaching ``cross``
    of the side past the midline (JigClu); ``random=False``: the centre square instead."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    quadrant: int | None = None
    cross: float = 0.3
    random: bool = True


def view_size(views: list[ViewSpec]) -> int:
    """The common output side of ``views`` (a batch holds them as one (B, V, 3, S, S) tensor)."""
    sizes = {v.size for v in views}
    if len(sizes) != 1:
        raise ValueError(f"all views of a batch must have one size, got {sorted(sizes)}")
    return sizes.pop()


def region(view: ViewSpec, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the part of a height x width image that ``view`` crops from: the
    whole image, or one JigClu quadrant with the official geometry (``cross * side`` past the
    midline ``side // 2``, a float rounded to whole pixels as PIL's ``crop`` rounds it)."""
    if view.quadrant is None:
        return 0, 0, height, width
    ch, cw = view.cross * height, view.cross * width
    bottom, right = view.quadrant in (1, 3), view.quadrant in (2, 3)
    top = round(height // 2 - ch) if bottom else 0
    left = round(width // 2 - cw) if right else 0
    lower = height if bottom else round(height // 2 + ch)
    edge = width if right else round(width // 2 + cw)
    return top, left, lower - top, edge - left


def crop_box(rng: random.Random, height: int, width: int, scale=(0.08, 1.0),
             ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) drawn by torchvision's ``RandomResizedCrop.get_params`` algorithm (10
    tries of a log-uniform aspect and a uniform area fraction, then the ratio-clamped centre
    crop), from ``rng`` instead of torch's global generator: get_params cannot take a
    generator, and per-sample torch generators cost ~20x more than this loop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_boxes(views: list[ViewSpec], height: int, width: int, rng: random.Random) -> torch.Tensor:
    """(V, 4) float64 boxes (top, left, h, w) in the original image's pixels, one per view."""
    boxes = []
    for view in views:
        if not view.random:
            side = min(height, width)
            boxes.append(((height - side) // 2, (width - side) // 2, side, side))
            continue
        top, left, h, w = region(view, height, width)
        t, lf, bh, bw = crop_box(rng, h, w, view.scale, view.ratio)
        boxes.append((top + t, left + lf, bh, bw))
    return torch.tensor(boxes, dtype=torch.float64)


def sample_rng(*place: int) -> random.Random:
    """The random source of one sample, seeded by its place in the stream (run seed, epoch,
    rank, worker role, index in that role's shuffled stream). Python's hash of a tuple of ints is
    the same in every process (hash randomisation only affects str/bytes)."""
    return random.Random(hash(place))
