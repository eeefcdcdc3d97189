"""The epoch partitioner alone (no data): one order per epoch, disjoint balanced parts, and the
exactly-once property across a change of layout mid-epoch, up to 1,024 processes x 8 workers."""

import numpy as np
import pytest

from selfsup import partition as pt


def covered(intervals_lists) -> list:
    """All positions of several interval lists, with repeats (a slow, obvious reference)."""
    return sorted(p for iv in intervals_lists for lo, hi in iv for p in range(lo, hi))


def test_the_order_is_a_permutation_and_depends_on_seed_epoch_and_index_only():
    sizes = [5, 17, 1, 9, 30, 2]
    order = pt.EpochOrder(sizes, seed=3, epoch=1, block=7)
    c = order.to_c(0, order.total)
    assert sorted(c.tolist()) == list(range(64))  # every sample of the epoch once
    shard, offset = order.locate(c)
    ids = [order.sample_id(int(s), int(o)) for s, o in zip(shard, offset)]
    assert sorted(ids) == list(range(64)) and all(0 <= o < sizes[s] for s, o in zip(shard, offset))
    # the reference: C is the shards in the epoch's order, end to end
    ref = [(s, o) for s in order.shard_order for o in range(sizes[s])]
    assert [ref[i] for i in c.tolist()] == list(zip(shard.tolist(), offset.tolist()))
    # block shuffling: each block of 7 permuted within itself
    assert all(set(c[k:k + 7].tolist()) == set(range(k, min(k + 7, 64))) for k in range(0, 64, 7))
    assert c.tolist() != list(range(64))
    same = pt.EpochOrder(sizes, seed=3, epoch=1, block=7)
    assert same.to_c(0, 64).tolist() == c.tolist() and same.to_c(10, 30).tolist() == c[10:30].tolist()
    assert pt.EpochOrder(sizes, seed=3, epoch=2, block=7).to_c(0, 64).tolist() != c.tolist()


def test_intervals_take_prefix_subtract_against_sets():
    iv = [(0, 5), (8, 12), (20, 21)]
    parts = pt.take(iv, [3, 4, 2])
    assert covered(parts) == [0, 1, 2, 3, 4, 8, 9, 10, 11]
    assert covered([parts[1]]) == [3, 4, 8, 9]
    assert pt.prefix(iv, 7) == [(0, 5), (8, 10)]
    left = pt.subtract(iv, [(1, 3), (9, 12)])
    assert covered([left]) == sorted(set(covered([iv])) - {1, 2, 9, 10, 11})
    with pytest.raises(ValueError):
        pt.take(iv, [11])


@pytest.mark.parametrize("world,workers,batch,start", [(1, 3, 4, 0), (2, 2, 3, 5), (3, 1, 2, 1)])
def test_parts_are_disjoint_balanced_and_cover_all_but_less_than_a_global_batch(world, workers, batch, start):
    total = 103
    end = total // (world * batch)
    seg = pt.first_segment(total, world, workers, batch, end)
    seg.start = start
    parts = seg.parts()
    assert len(parts) == world * workers
    pos = covered(parts)
    assert len(pos) == len(set(pos)) == (end - start) * world * batch
    assert pos == list(range(len(pos)))  # the remainder left over is the tail of the order
    for q, part in enumerate(parts):  # a worker gets exactly its batches' samples
        w = q % workers
        n = len([j for j in range(start, end) if j % workers == w])
        assert pt.size(part) == n * batch


def _use(seg: pt.Segment, batches_done: int) -> dict:
    """Roles' positions after every process used its next ``batches_done`` batches."""
    return {r * seg.workers + w: pt.worker_batches(seg.start, seg.start + batches_done, w, seg.workers)
            * seg.batch for r in range(seg.world) for w in range(seg.workers)}


def test_a_change_of_layout_mid_epoch_uses_each_sample_once():
    total, seg = 1000, pt.first_segment(1000, 2, 2, 6, 1000 // 24 * 2)  # global batch 24, accum 2
    drawn = _use(seg, 14)  # 7 steps
    used1 = [pt.prefix(part, drawn[q]) for q, part in enumerate(seg.parts())]
    nxt = pt.resegment(seg, drawn, world=3, workers=1, batch=4, steps_per_epoch=41, accum=2, total=total)
    assert nxt.start == 14 and nxt.end == 82 and pt.size(nxt.remaining) == 1000 - 168
    drawn2 = _use(nxt, 10)
    used2 = [pt.prefix(part, drawn2[q]) for q, part in enumerate(nxt.parts())]
    last = pt.resegment(nxt, drawn2, world=1, workers=4, batch=6, steps_per_epoch=41, accum=4, total=total)
    rest = last.parts()
    everything = covered(used1 + used2 + rest)
    assert len(everything) == len(set(everything)) == 41 * 24  # no sample twice
    assert everything == list(range(41 * 24))  # none skipped: only the last 16 of the order dropped


def test_1024_processes_x_8_workers_over_100k_uneven_shards_then_768_processes():
    """The issue's scale: 100,000 shards of 1-2,000 samples (about 100 million samples), global
    batch 3,072 (1,024 x 3, then 768 x 4), the change after 5,000 of the epoch's steps."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 2001, size=100_000)
    order = pt.EpochOrder(sizes.tolist(), seed=0, epoch=4, block=2000)
    total, G = order.total, 3072
    spe = total // G
    seg = pt.first_segment(total, 1024, 8, 3, spe)
    parts = seg.parts()
    sizes_q = [pt.size(p) for p in parts]
    assert sum(sizes_q) == spe * G and total - spe * G < G
    assert max(sizes_q) - min(sizes_q) <= 3  # balanced: at most one batch apart
    drawn = _use(seg, 5000)
    nxt = pt.resegment(seg, drawn, world=768, workers=8, batch=4, steps_per_epoch=spe, accum=1, total=total)
    assert nxt.start == 5000 and nxt.world * nxt.batch == G
    new = nxt.parts()
    used = [pt.prefix(p, drawn[q]) for q, p in enumerate(parts)]
    # exactly once, by interval arithmetic (a per-sample check of 1e8 samples is the small tests' job)
    spans = pt.merge([iv for part in used + new for iv in part])
    assert spans == [(0, spe * G)]
    assert sum(pt.size(p) for p in used + new) == spe * G  # merged and summed agree: no overlap
    assert sum(pt.size(p) for p in new) == (spe - 5000) * G
    # the order is one permutation: a window of S maps into C one to one
    c = order.to_c(123_456, 133_456)
    assert len(set(c.tolist())) == 10_000
