"""Streaming training data from WebDataset shards, with exact resume.

Why a hand-written stream rather than ``wds.WebDataset(...)``: three things a multi-node run needs
are not expressed by chaining webdataset's filters:

* **Equal batch counts on every rank.** DDP hangs if one rank runs out of data first. Every rank
  yields exactly ``samples_per_epoch // (world_size * batch_size)`` batches per epoch; a worker that
  exhausts its shards starts over on them (reshuffled), as timm's ``reader_wds.py`` does.
* **Exact resume mid-epoch.** Each data-loader worker plays a *role* (a fixed slice of the work);
  every batch carries its role and how many samples that role had drawn from its shuffle buffer.
  The trainer stores those positions in the checkpoint; on resume each role fast-forwards past the
  samples already used *without decoding them*, and roles are rotated over the workers so that the
  batch order is the same as if the run had never stopped.
* **Corrupt samples are skipped and counted**, never fatal; the count travels with the batches.

Tar reading itself (local files, ``pipe:`` commands, http URLs) is webdataset's.

Images are decoded to fixed-size ``uint8`` tensors (``decode_size``, shorter side resized then
centre-cropped). Augmentation happens afterwards on the whole batch, on the training device
(:mod:`selfsup.augment`), so the CPU only decodes.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from selfsup.shards import ShardSet, resolve_shards

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "ppm", "bmp")


class DataError(ValueError):
    """Bad data configuration (one-line message naming the key and the fix)."""


def split_shards(urls: list[str], rank: int, world_size: int, worker: int, num_workers: int):
    """Shards of one (rank, worker) role and the sample stride within them.

    Returns ``(urls, stride, offset)``: the role reads ``urls`` and keeps samples whose running
    index ``i`` satisfies ``i % stride == offset``. With at least as many shards as roles, shards
    are interleaved over roles (every shard read by exactly one role, stride 1). With fewer shards
    than roles (small data sets on many GPUs) every role reads every shard and keeps every
    ``stride``-th sample instead, so that still no sample is used twice.
    """
    roles = world_size * num_workers
    role = rank * num_workers + worker
    if len(urls) >= roles:
        return urls[role::roles], 1, 0
    return list(urls), roles, role


def _shuffle(samples, bufsize: int, rng: random.Random):
    """Buffer shuffle with an explicit RNG, so that a role's order is reproducible."""
    buf = []
    for sample in samples:
        if len(buf) < bufsize:
            buf.append(sample)
            continue
        i = rng.randrange(len(buf))
        buf[i], sample = sample, buf[i]
        yield sample
    rng.shuffle(buf)
    yield from buf


def decode_image(sample: dict, size: int) -> torch.Tensor:
    """Decode one sample's image to a (3, size, size) uint8 tensor (grayscale → 3 channels)."""
    data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if data is None:
        raise ValueError(f"sample {sample.get('__key__')} has no image member")
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        w, h = img.size
        if min(w, h) != size:
            scale = size / min(w, h)
            img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                             Image.BILINEAR)
            w, h = img.size
        if (w, h) != (size, size):
            left, top = (w - size) // 2, (h - size) // 2
            img = img.crop((left, top, left + size, top + size))
        arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def decode_label(sample: dict) -> int:
    cls = sample.get("cls")
    return int(cls.decode() if isinstance(cls, bytes) else cls) if cls is not None else -1


@dataclass
class StreamPlan:
    """Everything a worker needs to produce its part of one epoch."""

    urls: list[str]
    batch_size: int
    batches_per_rank: int
    rank: int
    world_size: int
    num_workers: int
    seed: int
    epoch: int
    decode_size: int
    shuffle_buffer: int
    start_batch: int = 0
    positions: dict | None = None  # role -> samples drawn from that role's buffer


class ShardStream(IterableDataset):
    """One rank's batches of one epoch (see the module docstring for the bookkeeping)."""

    def __init__(self, plan: StreamPlan):
        self.plan = plan

    def _role(self) -> int:
        info = get_worker_info()
        wid = info.id if info is not None else 0
        return (wid + self.plan.start_batch) % self.plan.num_workers

    def _num_batches(self, role: int) -> int:
        p = self.plan
        total = p.batches_per_rank // p.num_workers + (role < p.batches_per_rank % p.num_workers)
        done = len(range(role, p.start_batch, p.num_workers))
        return total - done

    def _samples(self, role: int, rng: random.Random) -> Iterator[dict]:
        """Endless stream of this role's raw (undecoded) samples: pass after pass over its
        shards, each pass buffer-shuffled and drained before the next, so that one pass uses
        every sample exactly once; shards are reshuffled for every further pass."""
        p = self.plan
        urls = list(p.urls)
        random.Random(p.seed * 1_000_003 + p.epoch).shuffle(urls)  # same order on every role
        mine, stride, offset = split_shards(urls, p.rank, p.world_size, role, p.num_workers)
        stats = self.stats

        def handler(exc: Exception) -> bool:
            stats["corrupt"] += 1
            return True

        def one_pass():
            stream = tarfile_samples(({"url": u} for u in mine), handler=handler)
            return (s for i, s in enumerate(stream) if i % stride == offset)

        for rnd in range(1 << 30):
            if rnd:
                random.Random(hash((p.seed, p.epoch, p.rank, role, rnd))).shuffle(mine)
            seen = 0
            for sample in _shuffle(one_pass(), p.shuffle_buffer, rng):
                seen += 1
                yield sample
            if seen == 0:
                raise DataError(f"no samples could be read from {len(mine)} shard(s), "
                                f"e.g. {mine[0]}: check data.train")

    def __iter__(self):
        p = self.plan
        role = self._role()
        self.stats = {"corrupt": 0}
        rng = random.Random(hash((p.seed, p.epoch, p.rank, role)))
        shuffled = self._samples(role, rng)
        drawn = 0
        skip = (p.positions or {}).get(role, 0) if p.start_batch else 0
        for _ in range(skip):  # fast-forward past samples used before the checkpoint
            next(shuffled)
            drawn += 1
        for _ in range(self._num_batches(role)):
            images, labels, keys = [], [], []
            while len(images) < p.batch_size:
                sample = next(shuffled)
                drawn += 1
                try:
                    images.append(decode_image(sample, p.decode_size))
                except Exception:  # undecodable image: skip and count, never fatal
                    self.stats["corrupt"] += 1
                    continue
                labels.append(decode_label(sample))
                keys.append(sample["__key__"])
            corrupt, self.stats["corrupt"] = self.stats["corrupt"], 0
            yield {"image": torch.stack(images), "label": torch.tensor(labels),
                   "key": keys, "role": role, "drawn": drawn, "corrupt": corrupt}


class ShardLoader:
    """Per-rank loader of training batches from a shard specification.

    ``epoch(e, start_batch, positions)`` returns an iterable over the remaining batches of epoch
    ``e`` for this rank. ``batches_per_epoch`` is identical on every rank.
    """

    def __init__(self, spec: str, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 2, seed: int = 0, decode_size: int = 32,
                 shuffle_buffer: int = 2000, samples_per_epoch: int | None = None,
                 key: str = "data.train", prefer: tuple = ("train",)):
        try:
            self.shards: ShardSet = resolve_shards(spec, prefer)
        except ValueError as e:
            raise DataError(f"{key}: {e}") from None
        total = samples_per_epoch or self.shards.num_samples
        if total is None:
            raise DataError(f"{key}: the shards {spec!r} have no index json with sample counts; "
                            "set data.samples_per_epoch=N")
        self.samples_per_epoch = total
        self.batches_per_epoch = total // (world_size * batch_size)
        if self.batches_per_epoch == 0:
            raise DataError(f"{key}: {total} samples is less than one global batch of "
                            f"{world_size}x{batch_size}; lower train.batch_size")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers, self.seed, self.decode_size = num_workers, seed, decode_size
        self.shuffle_buffer = shuffle_buffer

    def epoch(self, epoch: int, start_batch: int = 0, positions: dict | None = None):
        plan = StreamPlan(self.shards.urls, self.batch_size, self.batches_per_epoch, self.rank,
                          self.world_size, max(1, self.num_workers), self.seed, epoch,
                          self.decode_size, self.shuffle_buffer, start_batch, positions)
        stream = ShardStream(plan)
        if self.num_workers == 0:
            return iter(stream)
        return iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                               persistent_workers=False, pin_memory=torch.cuda.is_available(),
                               prefetch_factor=4))
