"""``selfsup-eval embed CHECKPOINT --data SHARDS --out DIR``: every sample's feature, to disk.

Writes, in shard order (the one-process order, also under torchrun):

* ``DIR/embeddings.npy``: float32 (``--dtype float16`` halves it), N × D, a plain ``.npy`` that
  ``numpy.load(path, mmap_mode="r")`` opens without reading it whole;
* ``DIR/index.csv``: ``row,key,label,shard`` (label empty for an unlabelled sample, shard the
  shard's URL as the specification resolved it);
* ``DIR/embed.json``: the checkpoint (path, sha256 of its bytes, name, step), the shards, the
  protocol (the probes' transform settings) and the shape; written last, so its presence says the
  other two are complete.

Why it reuses the probes' path: the features are those of :mod:`selfsup_eval.features` (the same
decoding, normalisation, pooling and precision), and a cache file the probes wrote for the same
(checkpoint, shards, transform) is read instead of extracting again, memory-mapped, so the
embeddings are bit for bit the features the k-NN used. A cache miss extracts without filling the
cache (a cache file is one tensor, which would hold the whole matrix in memory).

Memory stays bounded: each batch's features go straight to a per-process part file
(``DIR/.part-RANK.f32``), and rank 0 copies the parts into ``embeddings.npy`` in blocks of
:data:`BLOCK` rows, in ``(shard, position)`` order. Under torchrun the processes share the shards
as the probes do (:mod:`selfsup_eval.data`); DIR must be on a file system every process sees.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

import numpy as np
import torch

from selfsup_eval.checkpoint import EvalError, expand_checkpoints
from selfsup_eval.features import cache_key, default_cache_dir, dist_info, extract, transform_settings

BLOCK = 65536  # rows per copy block: 64k x 2048 float32 = 512 MiB at most
FILES = ("embeddings.npy", "index.csv", "embed.json")


def build_parser() -> argparse.ArgumentParser:
    from selfsup_eval.common import add_model_arguments

    p = argparse.ArgumentParser(prog="selfsup-eval embed", description="Write every sample's feature "
                                "(the probes' protocol and cache) as DIR/embeddings.npy + index.csv + embed.json.")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="export .safetensors, run directory (its latest export) or raw-pixels")
    p.add_argument("--data", required=True, metavar="SHARDS", help="shards (labels optional; docs/formats.md)")
    p.add_argument("--out", required=True, metavar="DIR", help="where embeddings.npy, index.csv, embed.json go")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    add_model_arguments(p)
    p.add_argument("--raw-size", type=int, default=None, metavar="N",
                   help="raw-pixels: resize + centre-crop to N (default: native size)")
    p.add_argument("--cache-dir", default=None,
                   help="feature cache (default $SELFSUP_EVAL_CACHE or ~/.cache/selfsup-eval)")
    p.add_argument("--no-cache", action="store_true", help="extract without reading the cache")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=None, help="image-decoding threads (default min(4, CPUs))")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def check_args(args, error) -> None:
    if args.batch_size < 1 or (args.raw_size is not None and args.raw_size < 1):
        error("--batch-size and --raw-size must be positive")
    if args.input_size is not None and args.input_size < 1:
        error("--input-size must be positive")


def _from_cache(path: Path) -> dict | None:
    """A probes' cache file with per-row shards, memory-mapped (the features are not read whole)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if isinstance(data.get("features"), torch.Tensor) and isinstance(data.get("shard"), torch.Tensor):
            return data
    except Exception:  # damaged or older: extract instead
        pass
    return None


class _PartWriter:
    """This process's features, appended batch by batch to a raw file; order and keys kept."""

    def __init__(self, path: Path):
        self.path, self.file = path, path.open("wb")
        self.order, self.keys, self.labels, self.dim = [], [], [], None

    def __call__(self, order, keys, labels, feats: torch.Tensor) -> None:
        self.dim = feats.shape[1]
        self.file.write(np.ascontiguousarray(feats.numpy(), dtype=np.float32).tobytes())
        self.order += order
        self.keys += keys
        self.labels += labels


def _write_npy(path: Path, n: int, dim: int, dtype: str, rows) -> None:
    """``rows(start, stop)`` → float32 block; written to a temporary name, then renamed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=(n, dim))
        for start in range(0, n, BLOCK):
            out[start:start + BLOCK] = rows(start, min(n, start + BLOCK))
        out.flush()
        del out
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_index(path: Path, keys, labels, shards, urls) -> None:
    """``index.csv``, streamed to a temporary name, then renamed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["row", "key", "label", "shard"])
            for i, (k, y, s) in enumerate(zip(keys, labels, shards)):
                w.writerow([i, k, "" if y < 0 else y, urls[s]])
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def embed_to(args) -> dict:
    """The whole command after parsing (every process): returns what ``embed.json`` holds
    (on rank 0; the other processes get None). Raises :class:`EvalError` for bad input."""
    from selfsup_eval.common import check_checkpoint, load_any, prepare_raw, resolve

    rank, world = dist_info()
    data = resolve(args.data, "data")
    path = expand_checkpoints([args.checkpoint])[-1]  # a run directory: its latest export
    check_checkpoint(path, args)
    bb = load_any(path, args)
    if bb.is_raw:
        prepare_raw(bb, data)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EvalError(f"--out {args.out}: cannot create it ({e.strerror or e})") from None
    cache = None if args.no_cache else Path(args.cache_dir or default_cache_dir())
    cached = None
    if cache is not None and rank == 0:
        f = cache / f"{cache_key(bb, data.urls, args.device)}.pt"
        cached = _from_cache(f) if f.is_file() else None
    if world > 1:
        import torch.distributed as dist

        hit = [cached is not None]
        dist.broadcast_object_list(hit, src=0)
        if not hit[0]:
            cached = None
        elif rank != 0:
            return None
    settings = transform_settings(bb, args.device)
    if cached is not None:
        feats = cached["features"]
        keys, labels, shards, corrupt = cached["key"], cached["label"], cached["shard"], cached["corrupt"]
        n, dim = feats.shape
        rows = lambda a, b: feats[a:b].numpy()  # noqa: E731
        parts = []
    else:
        part = _PartWriter(out / f".part-{rank}.f32")
        try:
            res = extract(bb, data.urls, batch_size=args.batch_size, device=args.device,
                          desc=f"{bb.name} embed", total=data.num_samples, workers=args.workers,
                          expected=data.shard_sizes, sink=part, require_labels=False)
        except BaseException:  # nothing half-written left in --out
            part.file.close()
            part.path.unlink(missing_ok=True)
            raise
        part.file.close()
        np.save(out / f".part-{rank}.order.npy", np.asarray(part.order, dtype=np.int64).reshape(-1, 2))
        if world > 1:
            import torch.distributed as dist

            dims = [None] * world
            dist.all_gather_object(dims, part.dim)
            dist.barrier()  # every part file is complete before rank 0 reads it
            if rank != 0:
                return None
        else:
            dims = [part.dim]
        dim = next((d for d in dims if d is not None), 0)
        keys, labels, shards, corrupt = res["key"], res["label"], res["shard"], res["corrupt"]
        parts = [(out / f".part-{r}.f32", np.load(out / f".part-{r}.order.npy")) for r in range(world)]
        maps = [np.memmap(p, dtype=np.float32, mode="r", shape=(len(o), dim)) if len(o) else None
                for p, o in parts]
        # global row → (part, row in part), sorted by (shard, position): the one-process order
        src = np.concatenate([np.full(len(o), r) for r, (_, o) in enumerate(parts)]).astype(np.int64)
        local = np.concatenate([np.arange(len(o)) for _, o in parts]).astype(np.int64)
        orders = np.concatenate([o for _, o in parts]) if parts else np.zeros((0, 2), np.int64)
        perm = np.lexsort((orders[:, 1], orders[:, 0])) if len(orders) else np.zeros(0, np.int64)
        src, local, n = src[perm], local[perm], len(perm)

        def rows(a, b):
            block = np.empty((b - a, dim), np.float32)
            for r, m in enumerate(maps):
                sel = src[a:b] == r
                if sel.any():
                    block[sel] = m[local[a:b][sel]]
            return block
    if n == 0:
        raise EvalError(f"--data {args.data}: no decodable samples")
    try:
        _write_npy(out / "embeddings.npy", n, dim, args.dtype, rows)
        _write_index(out / "index.csv", keys, labels.tolist(), shards.tolist(), data.urls)
        info = {"checkpoint": path, "checkpoint_sha256": bb.digest, "name": bb.name, "step": bb.step,
                "objective": bb.meta.get("objective"), "data": args.data, "shards": list(data.urls),
                "class_names": data.class_names, "rows": n, "dim": int(dim), "dtype": args.dtype,
                "corrupt_samples": corrupt, "from_cache": cached is not None,
                "protocol": {**settings, "features": "the probes' (selfsup-eval knn/linear), "
                             "frozen backbone in eval mode"}}
        _write_text(out / "embed.json", json.dumps(info, indent=1) + "\n")
    finally:
        for p, o in parts:
            p.unlink(missing_ok=True)
            p.with_name(p.name.replace(".f32", ".order.npy")).unlink(missing_ok=True)
    return info


def read_index(path) -> list[dict]:
    """``index.csv`` as rows ``{"row": int, "key": str, "label": int | None, "shard": str}``."""
    with open(path, newline="") as f:
        return [{"row": int(r["row"]), "key": r["key"], "label": int(r["label"]) if r["label"] else None,
                 "shard": r["shard"]} for r in csv.DictReader(f)]


def main(argv: list[str]) -> int:
    from selfsup_eval.common import run_guarded

    p = build_parser()
    try:
        args = p.parse_args(argv)
        check_args(args, p.error)
    except SystemExit as e:
        return int(e.code or 0)

    def work():
        info = embed_to(args)
        if info is not None:
            print(f"embeddings: {info['rows']} x {info['dim']} {info['dtype']} "
                  f"({'from the feature cache' if info['from_cache'] else 'extracted'}) -> "
                  f"{Path(args.out) / 'embeddings.npy'}")
    return run_guarded(args, work)
