"""Streaming training data from WebDataset shards, with exact resume.

Shards whose index counts every shard's samples are read as *exact epochs*
(:mod:`selfsup.epoch_stream`: one global order, each sample once per epoch, resumable on another
layout); this module's :class:`ShardStream` is the stream for the others (no counts, or a
``data.samples_per_epoch`` of their own), and :class:`ShardLoader` chooses.

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

Tar reading itself (local files, ``pipe:`` commands, http URLs) is webdataset's; ``pipe:``
commands run in a process group that is killed when the reader stops (:mod:`selfsup_io.pipes`).

Each sample becomes its views, uint8 (V, 3, S, S): the crop boxes are drawn over the whole
original image from its header size (:mod:`selfsup.views`, the objective says which views), then
the image is decoded only as far as the boxes need, in the worker (``decode="cpu"``) or batched on
the training device (``decode="device"``, :mod:`selfsup.decode`). Flips, colour and blur follow on
the whole batch on the training device (:mod:`selfsup.augment`). A pass over the shards in which
no image decodes is an error (bad data must not turn into an endless loop).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from selfsup.epoch_stream import ExactEpoch
from selfsup.decode import (DeviceDecoder, decode_views, device_decodable, device_pixel_budget, open_image,
                            to_device)
from selfsup.errors import DataError  # noqa: F401  (raised here; also imported from here)
from selfsup_io.shards import ShardSet, resolve_shards
from selfsup.views import ViewSpec, sample_boxes, sample_rng, view_size
from selfsup_io import BadLabel, image_member, label_member
from selfsup_io.images import check_pixels
from selfsup_io.jpeg_check import check_jpeg
from selfsup_io.pipes import tar_samples  # pipe: commands die with their reader

DECODE_MODES = ("cpu", "device")


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


def sample_label(sample: dict) -> int:
    """The class index, or -1 for an unlabelled sample. A label that does not parse also gives
    -1: pretraining does not use labels, so it is no reason to drop the image."""
    try:
        label = label_member(sample)
    except BadLabel:
        return -1
    return -1 if label is None else label


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
    views: list[ViewSpec]
    decode: str
    shuffle_buffer: int
    start_batch: int = 0
    positions: dict | None = None  # role -> samples drawn from that role's buffer
    sizes: dict | None = None  # url -> samples its index lists (None: no index)
    segment: dict | None = None  # exact epochs: selfsup.partition.Segment as JSON


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
        sizes = p.sizes or {}

        def shard(url: str):
            """One shard's samples. A read error ends the shard; a shard that ends before the
            count its index lists (a truncated tar, cut at a member boundary, reads short
            without any error) is an event: counted as corrupt and reported. With fewer shards
            than roles every role reads every shard, and only role offset 0 counts."""
            errors, n = [], 0

            def handler(exc: Exception) -> bool:
                errors.append(exc)
                return True

            for s in tar_samples(url, handler=handler):
                n += 1
                yield s
            if offset:
                return
            short = sizes[url] - n if url in sizes else 0
            stats["corrupt"] += max(len(errors), short)
            if short > 0:
                why = f": {' '.join(str(errors[0]).split())[:120]}" if errors else " (truncated tar?)"
                stats["events"].append(f"{url} ended after {n} of the {sizes[url]} samples its "
                                       f"index lists{why}; {short} counted as corrupt")

        def one_pass():
            stream = (s for u in mine for s in shard(u))
            return (s for i, s in enumerate(stream) if i % stride == offset)

        for rnd in range(1 << 30):
            if rnd:
                # (the trailing tag keeps this seed apart from the crop seed of sample ``rnd``)
                random.Random(hash((p.seed, p.epoch, p.rank, role, rnd, 1))).shuffle(mine)
            seen, stats["decoded_in_pass"] = 0, 0
            for sample in _shuffle(one_pass(), p.shuffle_buffer, rng):
                seen += 1
                yield sample
            if seen == 0:
                raise DataError(f"no samples could be read from {len(mine)} shard(s), "
                                f"e.g. {mine[0]}: check data.train")
            if stats["decoded_in_pass"] == 0:
                raise DataError(f"none of the {seen} images in {len(mine)} shard(s) (e.g. "
                                f"{mine[0]}) could be decoded: check data.train")

    def _sample(self, sample: dict, drawn: int, role: int, device_left: int = 0) -> dict:
        """One sample's views (``view``) or, for the device decoder, its JPEG bytes and boxes
        (``jpeg``, ``boxes``, ``pixels``) when it fits the ``device_left`` pixels of the batch's
        device budget (:func:`selfsup.decode.to_device`). Raises on an image that cannot be read."""
        p = self.plan
        data = image_member(sample)
        if data is None:
            raise ValueError(f"sample {sample.get('__key__')} has no image member")
        img = open_image(data)
        check_jpeg(data)  # ends early: PIL and nvJPEG/torchvision would return grey, no error
        width, height = img.size
        boxes = sample_boxes(p.views, height, width, self._crop_rng(sample, drawn, role))
        if p.decode == "device" and device_decodable(img, data) and \
                to_device(width, height, boxes, view_size(p.views), device_left):
            img.close()
            check_pixels(width, height)  # decoded whole on the device: a JPEG bomb stops here
            return {"jpeg": data, "boxes": boxes, "pixels": width * height}
        return {"view": decode_views(img, boxes, view_size(p.views))}

    def _crop_rng(self, sample: dict, drawn: int, role: int):
        p = self.plan
        return sample_rng(p.seed, p.epoch, p.rank, role, drawn)

    def __iter__(self):
        p = self.plan
        role = self._role()
        self.stats = {"corrupt": 0, "decoded_in_pass": 0, "events": []}
        rng = random.Random(hash((p.seed, p.epoch, p.rank, role)))
        shuffled = self._samples(role, rng)
        drawn = 0
        skip = (p.positions or {}).get(role, 0) if p.start_batch else 0
        for _ in range(skip):  # fast-forward past samples used before the checkpoint
            next(shuffled)
            drawn += 1
            # not decoded now, but they were before the checkpoint: a pass that starts among
            # them is no evidence that nothing decodes
            self.stats["decoded_in_pass"] += 1
        yield from self._batches(role, shuffled, drawn)

    def _batches(self, role: int, shuffled, drawn: int):
        """This role's batches from its stream of raw samples (``drawn`` of them used before)."""
        p = self.plan
        for _ in range(self._num_batches(role)):
            out, labels, keys = [], [], []
            device_left = device_pixel_budget(p.batch_size)  # pixels decoded whole on the device
            while len(out) < p.batch_size:
                sample = next(shuffled)
                drawn += 1
                try:
                    out.append(self._sample(sample, drawn, role, device_left))
                    device_left -= out[-1].get("pixels", 0)
                except Exception:  # undecodable image: skip and count, never fatal
                    self.stats["corrupt"] += 1
                    continue
                self.stats["decoded_in_pass"] += 1
                labels.append(sample_label(sample))
                keys.append(sample["__key__"])
            corrupt, self.stats["corrupt"] = self.stats["corrupt"], 0
            events, self.stats["events"] = self.stats["events"], []
            batch = {"label": torch.tensor(labels), "key": keys, "role": role, "drawn": drawn,
                     "corrupt": corrupt, "events": events}
            yield {**batch, **_collate(out, p.views)}


class EpochStream(ExactEpoch, ShardStream):
    """Exact epochs (:mod:`selfsup.epoch_stream`) with this module's batches and errors."""

    Error = DataError


def check_corrupt(corrupt: int, good: int, fraction: float, samples_per_epoch: int) -> None:
    """Raise :class:`DataError` once more than ``fraction`` (``data.max_corrupt_fraction``) of
    the samples drawn so far were corrupt. Judged only after ``min(1000, samples_per_epoch)``
    samples, so that a few bad files among the first batches do not stop a run; with
    ``fraction=0`` the first corrupt sample stops it."""
    drawn = corrupt + good
    if corrupt > fraction * drawn and (fraction == 0 or drawn >= min(1000, samples_per_epoch)):
        raise DataError(f"{corrupt} of the {drawn} samples drawn so far could not be read or decoded "
                        f"({corrupt / drawn:.1%}), more than data.max_corrupt_fraction={fraction}: "
                        "check data.train, or raise data.max_corrupt_fraction")


def _one_line_errors(loader: DataLoader):
    """The loader's batches; a DataError raised in a worker arrives wrapped in the worker's
    traceback (torch's ExceptionWrapper), so it is re-raised with the original one-line message."""
    try:
        yield from loader
    except DataError as e:
        last = str(e).strip().splitlines()[-1]
        prefix = f"{DataError.__module__}.{DataError.__qualname__}: "  # how the worker printed it
        raise DataError(last[len(prefix):] if last.startswith(prefix) else last) from None


def _collate(samples: list[dict], views: list[ViewSpec]) -> dict:
    """The batch's decoded views as ``image`` (B, V, 3, S, S); in device mode only those the
    worker decoded itself (``image_rows`` say which), plus the JPEGs left for the device, joined
    into one byte tensor (``jpeg``, split by ``jpeg_sizes``): one shared-memory transfer per batch
    instead of one per image."""
    rows = [i for i, s in enumerate(samples) if "view" in s]
    size = view_size(views)
    image = torch.stack([samples[i]["view"] for i in rows]) if rows else \
        torch.empty(0, len(views), 3, size, size, dtype=torch.uint8)
    if len(rows) == len(samples):
        return {"image": image}
    jpeg_rows = [i for i, s in enumerate(samples) if "jpeg" in s]
    return {"image": image, "image_rows": torch.tensor(rows, dtype=torch.long),
            "jpeg": torch.frombuffer(bytearray(b"".join(samples[i]["jpeg"] for i in jpeg_rows)),
                                     dtype=torch.uint8),
            "jpeg_sizes": torch.tensor([len(samples[i]["jpeg"]) for i in jpeg_rows], dtype=torch.long),
            "jpeg_rows": torch.tensor(jpeg_rows, dtype=torch.long),
            "jpeg_boxes": torch.stack([samples[i]["boxes"] for i in jpeg_rows])}


class ShardLoader:
    """Per-rank loader of training batches from a shard specification.

    ``epoch(e, start_batch, positions)`` returns an iterable over the remaining batches of epoch
    ``e`` for this rank. ``batches_per_epoch`` is identical on every rank.
    """

    def __init__(self, spec: str, *, batch_size: int, views: list[ViewSpec], rank: int = 0,
                 world_size: int = 1, num_workers: int = 2, seed: int = 0, decode: str = "cpu",
                 shuffle_buffer: int = 2000, samples_per_epoch: int | None = None,
                 key: str = "data.train", prefer: tuple = ("train",), grad_accum: int = 1):
        if decode not in DECODE_MODES:
            raise DataError(f"data.decode must be one of {', '.join(DECODE_MODES)}, not {decode!r}")
        try:
            self.shards: ShardSet = resolve_shards(spec, prefer)
            view_size(views)
        except ValueError as e:
            raise DataError(f"{key}: {e}") from None
        total = samples_per_epoch or self.shards.num_samples
        if total is None:
            raise DataError(f"{key}: the shards {spec!r} have no index json with sample counts; "
                            "set data.samples_per_epoch=N")
        self.samples_per_epoch = total
        # exact epochs (selfsup.epoch_stream) need every shard's count; the old stream otherwise
        self.exact = bool(self.shards.shard_sizes) and total == self.shards.num_samples
        # whole optimizer steps per epoch, so that an epoch's samples are exactly its steps' samples
        self.batches_per_epoch = total // (world_size * batch_size * grad_accum) * grad_accum
        if self.batches_per_epoch == 0:
            raise DataError(f"{key}: {total} samples is less than one global batch of "
                            f"{world_size}x{batch_size}x{grad_accum}; lower train.batch_size")
        self.dropped = total - self.batches_per_epoch * world_size * batch_size
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers, self.seed, self.views, self.decode = num_workers, seed, list(views), decode
        self.shuffle_buffer = shuffle_buffer
        self._decoders: dict = {}

    def first_segment(self) -> dict | None:
        """An epoch's plan before any of it is used (exact epochs; None for the old stream)."""
        if not self.exact:
            return None
        from selfsup.partition import first_segment

        return first_segment(self.samples_per_epoch, self.world_size, max(1, self.num_workers),
                             self.batch_size, self.batches_per_epoch).to_json()

    def epoch(self, epoch: int, start_batch: int = 0, positions: dict | None = None,
              segment: dict | None = None):
        """``segment``: what is left of the epoch and how it is split (exact epochs; default
        :meth:`first_segment`)."""
        sizes = dict(zip(self.shards.urls, self.shards.shard_sizes)) if self.shards.shard_sizes else None
        plan = StreamPlan(self.shards.urls, self.batch_size, self.batches_per_epoch, self.rank,
                          self.world_size, max(1, self.num_workers), self.seed, epoch,
                          self.views, self.decode, self.shuffle_buffer, start_batch, positions, sizes,
                          segment or self.first_segment())
        stream = EpochStream(plan) if plan.segment is not None else ShardStream(plan)
        if self.num_workers == 0:
            return iter(stream)
        return _one_line_errors(DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                                           persistent_workers=False,
                                           pin_memory=torch.cuda.is_available(), prefetch_factor=4))

    def to_device(self, batch: dict, device) -> dict:
        """The batch on ``device`` with ``image`` (B, V, 3, S, S) uint8 complete: in device mode
        the JPEGs the workers left are decoded and cropped there (their failures counted in
        ``corrupt``). Non-tensor entries are left as they are."""
        if "jpeg" in batch:
            if device not in self._decoders:
                self._decoders[device] = DeviceDecoder(device, view_size(self.views))
            try:
                batch = self._decoders[device].decode(batch)
            except ValueError as e:  # a whole batch of JPEGs nothing can decode
                raise DataError(f"{self.shards.spec}: {e}; check data.train") from None
        return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
                for k, v in batch.items()}
