"""One global sample order per epoch, and its split over processes and workers. Pure: no data,
no torch, no I/O, so that a plan for 1,024 processes over 100,000 shards can be simulated in a test.

**The order.** An epoch's order is a function of the run seed, the epoch and the shard sizes of
the index only (never of the number of processes or workers):

1. the shards are shuffled (seed, epoch) and laid end to end: *C*, the epoch's concatenation;
2. C is cut into blocks of ``block`` samples (a block may straddle a shard boundary), and the
   samples of each block are permuted (seed, epoch, block): *S*, the epoch's order. Position
   ``p`` of S is sample ``C[block_start + perm[p % block]]``.

Block shuffling mixes as much as the old per-worker shuffle buffer of the same size did (a worker
holds one block of raw samples), and a worker reading its part of S reads each shard of it once,
front to back.

**The split.** What is left of an epoch is a set of S positions, kept as sorted disjoint
intervals (``[(lo, hi), ...]``: at the start ``[(0, N)]``). Every (process, worker) *role* takes a
contiguous part of it, of exactly as many samples as that role's batches need (parts cut through
shards wherever the counts say), in role order ``rank * num_workers + worker``. The samples left
over (fewer than one global batch per epoch) are the tail of S: dropped for this epoch, and, since
S is reshuffled every epoch, different ones every epoch.

**Resuming.** A role uses its part front to back, so what an epoch has used is, per role, a
prefix of its part; the checkpoint stores per role how far it got. The epoch's remaining positions
are then the parts minus those prefixes (:func:`remaining_after`), whatever the world that used
them, and a resume with any number of processes or workers splits that remainder again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

Intervals = list  # [(lo, hi), ...] sorted, disjoint, half-open


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng([int(w) for w in words])


@dataclass
class EpochOrder:
    """The epoch's order S over the shards of ``sizes`` (samples per shard, index order)."""

    sizes: list[int]
    seed: int
    epoch: int
    block: int
    shard_order: np.ndarray = field(init=False, repr=False)  # shard ids in epoch (C) order
    starts: np.ndarray = field(init=False, repr=False)  # C start of each shard of shard_order, + N
    id_starts: np.ndarray = field(init=False, repr=False)  # index-order id of each shard's first sample

    def __post_init__(self):
        sizes = np.asarray(self.sizes, dtype=np.int64)
        if self.block < 1:
            raise ValueError(f"block must be >= 1, not {self.block}")
        self.shard_order = _rng(self.seed, self.epoch, 0x5A4D).permutation(len(sizes))
        self.starts = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes[self.shard_order], out=self.starts[1:])
        self.id_starts = np.zeros(len(sizes), dtype=np.int64)
        np.cumsum(sizes[:-1], out=self.id_starts[1:])

    @property
    def total(self) -> int:
        return int(self.starts[-1])

    def block_perm(self, k: int) -> np.ndarray:
        """C offsets (from the block's start) of block ``k``'s samples, in S order."""
        length = min(self.block, self.total - k * self.block)
        return _rng(self.seed, self.epoch, 0xB10C, k).permutation(length)

    def to_c(self, lo: int, hi: int) -> np.ndarray:
        """C indices of S positions ``[lo, hi)``, in S order."""
        out, p = [], lo
        while p < hi:
            k = p // self.block
            end = min(hi, (k + 1) * self.block)
            out.append(k * self.block + self.block_perm(k)[p - k * self.block:end - k * self.block])
            p = end
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def locate(self, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard id in index order, offset in that shard) of C indices ``c``."""
        j = np.searchsorted(self.starts, c, side="right") - 1
        return self.shard_order[j], c - self.starts[j]

    def sample_id(self, shard: int, offset: int) -> int:
        """The sample's place in the index (shard by shard): the same in every epoch and world."""
        return int(self.id_starts[shard] + offset)


# ------------------------------------------------------------------------------ intervals ----
def size(iv: Intervals) -> int:
    return sum(hi - lo for lo, hi in iv)


def merge(iv) -> Intervals:
    out: list = []
    for lo, hi in sorted((int(a), int(b)) for a, b in iv if b > a):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def take(iv: Intervals, counts: list[int]) -> list[Intervals]:
    """``iv`` cut, in order, into consecutive parts of ``counts`` samples (the rest is left)."""
    parts, i, at = [], 0, iv[0][0] if iv else 0
    for n in counts:
        part = []
        while n > 0:
            if i >= len(iv):
                raise ValueError("the parts ask for more samples than the intervals hold")
            lo, hi = iv[i]
            at = max(at, lo)
            step = min(n, hi - at)
            part.append((at, at + step))
            n -= step
            at += step
            if at >= hi:
                i += 1
        parts.append(part)
    return parts


def prefix(part: Intervals, n: int) -> Intervals:
    """The first ``n`` positions of ``part``."""
    return take(part, [min(n, size(part))])[0]


def subtract(iv: Intervals, used: Intervals) -> Intervals:
    """``iv`` minus ``used`` (both sorted, disjoint; ``used`` inside ``iv``)."""
    out, used = [], merge(used)
    j = 0
    for lo, hi in iv:
        at = lo
        while j < len(used) and used[j][1] <= at:
            j += 1
        k = j
        while k < len(used) and used[k][0] < hi:
            if used[k][0] > at:
                out.append((at, used[k][0]))
            at = max(at, used[k][1])
            k += 1
        if at < hi:
            out.append((at, hi))
    return out


# ----------------------------------------------------------------------------------- plan ----
def worker_batches(start: int, end: int, worker: int, num_workers: int) -> int:
    """How many of a process's batches ``[start, end)`` worker ``worker`` makes (batch ``j`` is
    made by worker ``j % num_workers``: the data loader's round robin)."""
    return len(range(start + (worker - start) % num_workers, end, num_workers))


def split(remaining: Intervals, world: int, workers: int, batch: int, start: int,
          end: int) -> list[Intervals]:
    """Each role's part (role ``rank * workers + worker``) for the batches ``[start, end)`` of
    every process; what is left of ``remaining`` after them is the epoch's dropped remainder."""
    counts = [worker_batches(start, end, w, workers) * batch for _ in range(world) for w in range(workers)]
    if sum(counts) > size(remaining):
        raise ValueError(f"{end - start} batches of {world}x{batch} need {sum(counts)} samples; "
                         f"{size(remaining)} are left in the epoch")
    return take(remaining, counts)


@dataclass
class Segment:
    """A stretch of an epoch trained with one layout: what was left of the epoch when it began,
    the layout, and the process batch index it began at. Stored in the checkpoint (JSON)."""

    remaining: Intervals
    world: int
    workers: int
    batch: int
    start: int  # first process batch of the segment
    end: int  # batches per process in the whole epoch, in this layout

    def parts(self) -> list[Intervals]:
        return split(self.remaining, self.world, self.workers, self.batch, self.start, self.end)

    def to_json(self) -> dict:
        return {"remaining": [list(x) for x in self.remaining], "world": self.world,
                "workers": self.workers, "batch": self.batch, "start": self.start, "end": self.end}

    @classmethod
    def from_json(cls, d: dict) -> "Segment":
        return cls([tuple(x) for x in d["remaining"]], d["world"], d["workers"], d["batch"],
                   d["start"], d["end"])


def remaining_after(seg: Segment, drawn: dict[int, int]) -> Intervals:
    """What is left of the epoch once every role ``q`` of ``seg`` has used the first
    ``drawn.get(q, 0)`` positions of its part (more than the part: all of it)."""
    used = [iv for q, part in enumerate(seg.parts()) for iv in prefix(part, drawn.get(q, 0))]
    return subtract(seg.remaining, used)


def resegment(seg: Segment, drawn: dict[int, int], world: int, workers: int, batch: int,
              steps_per_epoch: int, accum: int, total: int) -> Segment:
    """The segment that goes on from ``seg`` (roles' use ``drawn``) with a new layout: the steps
    left are as many global batches of ``world * batch * accum`` as the remainder holds."""
    left = remaining_after(seg, drawn)
    global_batch = world * batch * accum
    steps_left = min(size(left) // global_batch, steps_per_epoch)
    end = steps_per_epoch * accum
    return Segment(left, world, workers, batch, end - steps_left * accum, end)


def first_segment(total: int, world: int, workers: int, batch: int, batches_per_rank: int) -> Segment:
    return Segment([(0, total)] if total else [], world, workers, batch, 0, batches_per_rank)
