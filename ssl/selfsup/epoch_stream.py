"""The exact epoch stream: each role reads its part of the epoch's global order
(:mod:`selfsup.partition`), so every sample of the index is used once per epoch, on any number of
processes and workers, and a resume (with the same layout or another) skips exactly the samples
already used, without reading them.

Used (as :class:`selfsup.data.EpochStream`) when the shards have an index with sample counts and ``data.samples_per_epoch`` is not set
(or equals the index's count); otherwise :class:`selfsup.data.ShardStream` streams as before.

A role reads its part block by block: the block's samples it needs are read front to back from
their shard(s) (the others skipped undecoded, one open reader per shard, never reopened while the
role moves forward), held (at most ``data.shuffle_buffer`` raw samples) and given out in the
block's permuted order. A sample's crop boxes come from its place in the index and the epoch, so
they do not depend on the layout either.

Unreadable samples are skipped and counted, as in :mod:`selfsup.data`; a role that has used its
whole part and still needs samples for its last batch (its part had unreadable ones) takes them
from its own part again, from the start, and says so once: equal batch counts on every process
(DDP) come first, and those repeats are the only ones an epoch can have.
"""

from __future__ import annotations

import numpy as np

from selfsup import partition as pt
from selfsup.views import sample_rng
from selfsup_io.pipes import tar_samples


class _ShardReader:
    """Sample ``offset`` of a shard, reading forward; a new shard or a step back reopens."""

    def __init__(self, urls: list[str], sizes: list[int], stats: dict):
        self.urls, self.sizes, self.stats = urls, sizes, stats
        self.shard, self.it, self.pos, self.errors = None, None, 0, []
        self.reported: set = set()

    def close(self) -> None:
        if self.it is not None and hasattr(self.it, "close"):
            self.it.close()
        self.it = None

    def _open(self, shard: int) -> None:
        self.close()
        self.errors = []

        def handler(exc: Exception) -> bool:
            self.errors.append(exc)
            return True

        self.shard, self.pos = shard, 0
        self.it = tar_samples(self.urls[shard], handler=handler)  # a pipe: dies with its reader

    def get(self, shard: int, offset: int) -> dict | None:
        if shard != self.shard or offset < self.pos:
            self._open(shard)
        sample = None
        while self.pos <= offset:
            sample = next(self.it, None) if self.it is not None else None
            if sample is None:  # the shard ended before its index count: a truncated tar
                self.close()
                self._short(shard)
                return None
            self.pos += 1
        return sample

    def _short(self, shard: int) -> None:
        if shard in self.reported:
            return
        self.reported.add(shard)
        url, n = self.urls[shard], self.pos
        why = f": {' '.join(str(self.errors[0]).split())[:120]}" if self.errors else " (truncated tar?)"
        self.stats["events"].append(f"{url} ended after {n} of the {self.sizes[shard]} samples its "
                                    f"index lists{why}; {self.sizes[shard] - n} counted as corrupt")


class ExactEpoch:
    """One rank's batches of one epoch, each role reading its part of the global order: mixed
    into :class:`selfsup.data.ShardStream` (its batches, decoding and bookkeeping) as
    :class:`selfsup.data.EpochStream`, which sets ``Error`` to its ``DataError``."""

    Error = ValueError

    def _crop_rng(self, sample: dict, drawn: int, role: int):
        p = self.plan
        return sample_rng(p.seed, p.epoch, sample["__id__"], sample["__pass__"], 0x1D)

    def _chunks(self, part: pt.Intervals, skip: int):
        """The role's part in S order from position ``skip``, as lists of (pass, C index) of at
        most one block; a list ``None`` ends a pass. Further passes (replacements for unreadable
        samples) start over at the part's beginning."""
        order, total = self.order, pt.size(part)
        if not total:
            raise self.Error("a worker with no samples in this epoch was asked for a batch")
        for rnd in range(1 << 30):
            todo = pt.subtract(part, pt.prefix(part, skip)) if rnd == 0 else part
            for lo, hi in todo:
                at = lo
                while at < hi:  # a block at a time: one block's permutation in memory
                    end = min(hi, (at // order.block + 1) * order.block)
                    yield [(rnd, int(c)) for c in order.to_c(at, end)]
                    at = end
            yield None
            if self.stats["decoded_in_pass"] == 0:
                raise self.Error(f"none of the {total} samples of this worker's part of epoch "
                                f"{self.plan.epoch} could be read or decoded (e.g. "
                                f"{self.plan.urls[0]}): check data.train")
            self.stats["decoded_in_pass"] = 0
            if rnd == 0:
                self.stats["events"].append(
                    f"rank {self.plan.rank} worker {self._role()}: unreadable samples left its "
                    f"{total} samples of epoch {self.plan.epoch} short of its batches: samples of "
                    "its part are used again to fill them")

    def _raw(self, part: pt.Intervals, skip: int):
        """The part's raw samples in S order, read a block at a time in shard order."""
        reader = _ShardReader(self.plan.urls, [int(x) for x in self.order.sizes], self.stats)
        try:
            for chunk in self._chunks(part, skip):
                if chunk:  # (the reader stays open from one block to the next)
                    yield from self._read_block(reader, chunk)
        finally:  # the role has its batches: close the shard it was reading
            reader.close()

    def _read_block(self, reader: _ShardReader, pending: list):
        shards, offsets = self.order.locate(np.asarray([c for _, c in pending], dtype=np.int64))
        got: dict = {}
        for i in sorted(range(len(pending)), key=lambda i: pending[i][1]):  # shard order
            shard, offset = int(shards[i]), int(offsets[i])
            sample = reader.get(shard, offset)
            if sample is not None:
                sample["__id__"] = self.order.sample_id(shard, offset)
                sample["__pass__"] = pending[i][0]
                got[i] = sample
        for i in range(len(pending)):
            # a sample a short shard does not have: no image, so counted as unreadable
            yield got.get(i) or {"__key__": None}

    def __iter__(self):
        p = self.plan
        role = self._role()
        self.stats = {"corrupt": 0, "decoded_in_pass": 0, "events": []}
        seg = pt.Segment.from_json(p.segment)
        self.order = pt.EpochOrder([p.sizes[u] for u in p.urls], p.seed, p.epoch, p.shuffle_buffer)
        part = seg.parts()[p.rank * p.num_workers + role]
        skip = (p.positions or {}).get(role, 0) if p.start_batch > seg.start else 0
        self.stats["decoded_in_pass"] = skip  # used (and decoded) before the checkpoint
        yield from self._batches(role, self._raw(part, skip), skip)
