"""Reading labelled shards (docs/formats.md) and decoding samples into model inputs.

Decoding protocol (the usual centre-crop evaluation transform, DINO/MoCo ``eval`` style):

1. decode the image; convert to RGB for a 3-channel checkpoint (grayscale is replicated to three
   channels), to grayscale ``L`` for a 1-channel one;
2. resize the shorter side to the checkpoint's ``input_size`` (bilinear, antialiased, long side
   ``int(size * long / short)`` as torchvision's ``Resize``), then centre-crop ``input_size``
   (torchvision's ``CenterCrop`` offsets). An image already ``input_size`` square is returned
   untouched: no resampling at all, so evaluating at the training resolution adds no blur. A
   JPEG is decoded with libjpeg's DCT scaling at the largest reduction (1/2, 1/4, 1/8) that keeps
   its shorter side at least ``input_size``: a 2,000-px photo is decoded at 500 px instead of
   being decoded whole and then shrunk (the views differ from a full decode by about one grey
   level on average);
3. uint8 (C, H, W) here; scaling to [0, 1] and the checkpoint's mean/std happen batched on the
   extraction device (features.py).

Distribution: with ``world`` processes the first ``len(urls) - len(urls) % world`` shards are dealt
out whole (shard ``i`` to rank ``i % world``: each process reads only its own tars), and the
remaining shards are read by every process, which keeps the samples at positions ``p`` with
``p % world == rank``. So every sample goes to exactly one process, the load stays balanced
when there are fewer shards than processes, and each sample carries its position
``(shard index, position in shard)``: sorting by it restores the one-process order.

Damage: a shard that cannot be opened or read to its end is a *shard* problem (reported by the
caller as an error: a silently shortened split would change the accuracy); an undecodable image,
a sample without image or with an unparsable ``.cls`` is a *sample* problem: skipped and counted.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from selfsup_io import BadLabel, image_member, label_member
from selfsup_io.images import check_pixels, to_8bit
from selfsup_io.jpeg_check import check_jpeg

GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


@dataclass
class Sample:
    order: tuple[int, int]  # (shard index, position in shard): the single-process order
    key: str
    label: int | None  # None: no .cls member
    data: bytes | None  # None: no image member
    bad_label: bool = False  # a .cls that is not a decimal integer


@dataclass
class Problems:
    """What went wrong while reading, per process; summed over processes after the gather."""

    corrupt: int = 0  # skipped samples (undecodable image, no image, bad .cls)
    corrupt_keys: list[str] = field(default_factory=list)  # the first few, for the message
    unlabelled: int = 0  # samples without .cls
    unlabelled_keys: list[str] = field(default_factory=list)
    broken_shards: list[str] = field(default_factory=list)  # "url (after N samples): reason"
    # samples read per shard index, for shards read to their end: compared with the index's
    # counts, because a tar cut at a member boundary reads short without any error (issue #16)
    shard_counts: dict[int, int] = field(default_factory=dict)

    def add_corrupt(self, key: str) -> None:
        self.corrupt += 1
        if len(self.corrupt_keys) < 5:
            self.corrupt_keys.append(key)

    def add_unlabelled(self, key: str) -> None:
        self.unlabelled += 1
        if len(self.unlabelled_keys) < 5:
            self.unlabelled_keys.append(key)

    def merge(self, other: "Problems") -> None:
        self.corrupt += other.corrupt
        self.corrupt_keys = (self.corrupt_keys + other.corrupt_keys)[:5]
        self.unlabelled += other.unlabelled
        self.unlabelled_keys = (self.unlabelled_keys + other.unlabelled_keys)[:5]
        self.broken_shards += other.broken_shards
        for si, n in other.shard_counts.items():  # a shared shard is read whole by every process
            self.shard_counts[si] = max(n, self.shard_counts.get(si, 0))


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side → ``size`` then centre crop ``size``; the identity for a size×size image."""
    w, h = img.size
    if min(w, h) != size:
        if w <= h:
            w, h = size, int(size * h / w)
        else:
            w, h = int(size * w / h), size
        check_pixels(w, h, "resized image")  # a 1x20000 strip would become 256x5120000
        img = img.resize((w, h), Image.BILINEAR)
    if (w, h) != (size, size):
        left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    return img


def decode(data: bytes, size: int | None, channels: int) -> torch.Tensor:
    """Image bytes → uint8 (channels, size, size) (native size when ``size`` is None)."""
    check_jpeg(data)  # a JPEG that ends early decodes to grey without an error in PIL
    with Image.open(io.BytesIO(data)) as img:
        if size is not None and img.format in ("JPEG", "MPO"):  # MPO: cameras' multi-picture JPEG
            r = next(r for r in (8, 4, 2, 1) if min(img.size) // r >= size or r == 1)
            if r > 1:
                img.draft(None, (img.size[0] // r, img.size[1] // r))
        check_pixels(*img.size)  # what decoding allocates: a PNG bomb is a corrupt sample
        img = to_8bit(img).convert("RGB" if channels == 3 else "L")  # 16-bit: not clipped
        if size is not None:
            img = resize_center_crop(img, size)
        arr = np.asarray(img, dtype=np.uint8)
    # numpy's transpose: torch's uint8 permute copy is slow when threads compete (thread pool)
    return torch.from_numpy(arr[None].copy() if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1)))


def safe_decode(args) -> torch.Tensor | None:
    """:func:`decode` that returns None for an undecodable image (run in a thread pool)."""
    data, size, channels = args
    try:
        return decode(data, size, channels)
    except Exception:  # PIL raises many types for damaged bytes
        return None


def image_info(data: bytes) -> tuple[tuple[int, int], int]:
    """((width, height), 1 or 3 channels) of an encoded image, without decoding the pixels."""
    with Image.open(io.BytesIO(data)) as img:
        return img.size, 1 if img.mode in GRAY_MODES else 3


def _to_sample(raw: dict, order: tuple[int, int]) -> Sample:
    """A raw webdataset sample in any public layout (selfsup_io: image under jpg/png/webp...,
    label from cls, a json label field or txt)."""
    try:
        label, bad = label_member(raw), False
    except BadLabel:
        label, bad = None, True
    return Sample(order, raw["__key__"], label, image_member(raw), bad)


def shard_samples(url: str) -> Iterator[dict]:
    """The raw webdataset samples of one shard (local path, ``pipe:``, http(s)); errors raise."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    from selfsup_io.pipes import open_url

    stream = open_url(url)  # a pipe: command is killed when the reading stops
    finished = False
    try:
        files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
        yield from group_by_keys(files)
        finished = True
    finally:
        try:
            stream.close()  # a pipe: command's failure (non-zero exit) surfaces here
        except Exception:
            if finished:
                raise


def iter_samples(urls: list[str], rank: int = 0, world: int = 1,
                 problems: Problems | None = None) -> Iterator[Sample]:
    """This process's samples in shard order (see the module docstring for the split). A shard
    that fails to open or read is recorded in ``problems.broken_shards`` (or raised if None)."""
    whole = len(urls) - len(urls) % world
    for si, url in enumerate(urls):
        if si < whole and si % world != rank:
            continue
        shared = si >= whole
        pos = -1
        try:
            for raw in shard_samples(url):
                pos += 1
                if shared and pos % world != rank:
                    continue
                yield _to_sample(raw, (si, pos))
            if problems is not None:
                problems.shard_counts[si] = pos + 1
        except Exception as e:
            if problems is None:
                raise
            reason = " ".join(str(e).split())[:200] or type(e).__name__
            problems.broken_shards.append(f"{url} (after {pos + 1} samples): {reason}")


def first_sample(urls: list[str]) -> Sample | None:
    """The first sample of the split (every process reads the same one): used to reject
    unlabelled shards before a long extraction and to fix the raw-pixel baseline's shape."""
    from contextlib import closing

    for url in urls:
        try:
            with closing(shard_samples(url)) as samples:
                for raw in samples:
                    return _to_sample(raw, (0, 0))
        except Exception:
            return None  # reported properly by the extraction itself
    return None
