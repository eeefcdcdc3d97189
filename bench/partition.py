"""Cost of exact epochs at scale, the partitioner alone (no data): memory and time of the index's
shard counts, of one epoch's order, of the split over processes x workers, and of one block's
permutation; plus parsing an index json of that many shards (``selfsup_io.shards``). The numbers
in docs/elastic-epochs.md come from this script.

    python bench/partition.py --shards 500000 --per-shard 10000   # 5 billion samples
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from selfsup import partition as pt


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=500_000)
    ap.add_argument("--per-shard", type=int, default=10_000, help="mean samples per shard (uneven: 0.5-1.5x)")
    ap.add_argument("--processes", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--block", type=int, default=2000)
    ap.add_argument("--index", action="store_true", help="also write and parse an index json")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    sizes = rng.integers(args.per_shard // 2, args.per_shard * 3 // 2 + 1, size=args.shards).tolist()
    out = {"shards": args.shards, "samples": int(sum(sizes))}
    tracemalloc.start()
    order, out["order_s"] = timed(lambda: pt.EpochOrder(sizes, 0, 3, args.block))
    out["order_arrays_MiB"] = (order.shard_order.nbytes + order.starts.nbytes + order.id_starts.nbytes) / 2**20
    end = order.total // (args.processes * args.batch)
    seg = pt.first_segment(order.total, args.processes, args.workers, args.batch, end)
    parts, out["split_s"] = timed(seg.parts)
    drawn = {q: pt.size(p) // 3 for q, p in enumerate(parts)}
    nxt, out["resegment_s"] = timed(lambda: pt.resegment(seg, drawn, args.processes * 3 // 4, args.workers,
                                                          args.batch * 4 // 3, end // 1, 1, order.total))
    out["segment_json_KiB"] = len(json.dumps(nxt.to_json())) / 2**10
    n = 200
    _, t = timed(lambda: [order.locate(order.to_c(k * args.block, (k + 1) * args.block)) for k in range(n)])
    out["block_ms"] = 1000 * t / n
    out["blocks_per_epoch"] = -(-order.total // args.block)
    out["python_peak_MiB"] = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    if args.index:
        from selfsup_io.shards import resolve_shards

        with tempfile.TemporaryDirectory() as tmp:
            index = Path(tmp) / "train.json"
            index.write_text(json.dumps({"num_samples": out["samples"], "shards": [
                {"name": f"train-{i:07d}.tar", "num_samples": s} for i, s in enumerate(sizes)]}))
            for i in range(args.shards):  # resolve_shards checks that every shard exists
                (Path(tmp) / f"train-{i:07d}.tar").touch()
            tracemalloc.start()
            shards, out["index_parse_s"] = timed(lambda: resolve_shards(str(index), ("train",)))
            out["index_held_MiB"] = tracemalloc.get_traced_memory()[0] / 2**20
            out["index_peak_MiB"] = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
