"""Feature extraction: once per (checkpoint, shards, transform), cached on disk, distributed.

Protocol: each sample is decoded by :mod:`selfsup_eval.data` (resize shorter side + centre crop to
the checkpoint's ``input_size``, exact no-op at that size), scaled to [0, 1], normalised with the
checkpoint's mean/std, and embedded by the eval-mode backbone, pooled per its ``pool``; bf16
autocast on GPU, fp32 on CPU.

Why a cache: k-NN over several k, the linear probe and reruns (another k, another T, the same
checkpoint in a later sweep) all need the same features, and extraction is the expensive part.
The cache key is the sha256 of the checkpoint's bytes (raw pixels: the raw settings), the shard
list (plus size and mtime of local shards, so rewritten shards are not served stale) and the
transform settings including the precision (GPU bf16 features are not CPU fp32 features). A file
holds the keys, labels and features; it is written to a temporary name and renamed, so a killed
run never leaves a truncated cache file behind.

Distributed (torchrun / accelerate launch): the shards (or, for the remainder, the samples) are
split across processes (:func:`selfsup_eval.data.iter_samples`); sample keys, labels and their
``(shard, position)`` order go to every process (``all_gather_object``: small), the features to
rank 0 only (padded ``gather``: large), which restores the one-process order. A sample key seen
twice is an error, so nothing is counted twice; every sample of every shard is assigned to
exactly one process, so nothing is dropped. Every check that can fail runs on the gathered
metadata on *all* processes, so they fail together instead of leaving a peer hanging in a
collective.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from selfsup_eval.budgets import class_limit, drop_out_of_range, extraction_batch
from selfsup_eval.checkpoint import Backbone, EvalError
from selfsup_eval.data import Problems, iter_samples, safe_decode
from selfsup_io.progress import Progress

CACHE_VERSION = 2
RESIZE = "shorter-side bilinear + centre crop (identity at input_size)"


def dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def default_cache_dir() -> str:
    return os.environ.get("SELFSUP_EVAL_CACHE") or os.path.expanduser("~/.cache/selfsup-eval")


def precision(device) -> str:
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def channel_stats(values, channels: int, what: str) -> list[float]:
    values = [float(v) for v in values]
    if len(values) == channels:
        return values
    if len(values) == 1 or (channels == 1 and len(values) == 3 and len(set(values)) == 1):
        return values[:1] * channels
    raise EvalError(f"checkpoint {what} has {len(values)} values for a {channels}-channel input")


def transform_settings(bb: Backbone, device="cpu") -> dict:
    c = bb.in_chans
    return {"size": bb.input_size, "channels": c, "mean": channel_stats(bb.meta["mean"], c, "mean"),
            "std": channel_stats(bb.meta["std"], c, "std"), "pool": bb.meta.get("pool", "head"),
            "resize": RESIZE, "precision": precision(device) if not bb.is_raw else "fp32"}


def _fingerprint(url: str):
    try:
        st = os.stat(url)
        return [st.st_size, st.st_mtime_ns]
    except OSError:  # pipe:/http(s): the list itself is the key
        return None


def cache_key(bb: Backbone, urls: list[str], device="cpu") -> str:
    blob = json.dumps({"version": CACHE_VERSION, "checkpoint": bb.digest, "urls": list(urls),
                       "shards": [_fingerprint(u) for u in urls],
                       "transform": transform_settings(bb, device)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:40]


# ------------------------------------------------------------------------------ extraction ----
@torch.no_grad()
def extract(bb: Backbone, urls: list[str], *, batch_size: int = 256, device="cpu", desc: str = "",
            total: int | None = None, workers: int | None = None,
            expected: list[int] | None = None, sink=None, require_labels: bool = True) -> dict:
    """Features of every labelled, decodable sample of ``urls``, in shard order.

    Returns ``{"key": [str], "label": LongTensor (N,), "features": FloatTensor (N, D) (None on
    ranks other than 0 under torchrun), "corrupt": int, "corrupt_keys": [str], "shard": LongTensor
    (N,) (each row's index into ``urls``)}``. Raises
    :class:`EvalError` (on every process) for unlabelled samples, unreadable shards or keys seen
    twice, and for a shard that yields fewer samples than ``expected`` (its index count).

    ``sink(order, keys, labels, features)``, when given, receives each batch (this process's
    samples, ``order`` their ``(shard, position)``) instead of the result holding the features
    (``"features"`` is then None), so memory stays bounded (:mod:`selfsup_eval.embeddings`);
    ``require_labels=False`` keeps unlabelled samples, label -1.
    """
    rank, world = dist_info()
    batch_size = extraction_batch(bb, batch_size, quiet=rank != 0)  # within SELFSUP_EVAL_BATCH_GB
    settings = transform_settings(bb, device)
    size, channels = settings["size"], settings["channels"]
    mean = torch.tensor(settings["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(settings["std"], device=device).view(1, -1, 1, 1)
    bb.to(device)
    use_bf16 = settings["precision"] == "bf16"
    problems = Problems()
    order, keys, labels, chunks = [], [], [], []
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    # a bar on a terminal, a plain line a minute in a batch job (selfsup_io.progress)
    bar = Progress(None if total is None else -(-total // world), desc, unit="img",
                   enabled=rank == 0)

    def submit(samples):
        jobs = [(s.data, size, channels) for s in samples]
        return samples, (pool.map(safe_decode, jobs) if pool else map(safe_decode, jobs))

    def finish(samples, images):
        good = []
        for s, img in zip(samples, images):
            if img is None:
                problems.add_corrupt(s.key)
            else:
                good.append((s, img))
        if good:
            x = torch.stack([img for _, img in good]).to(device, non_blocking=True).float().div_(255)
            x = (x - mean) / std
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                f = bb.features(x)
            f = f.float().cpu()
            if sink is None:
                chunks.append(f)
            else:
                sink([s.order for s, _ in good], [s.key for s, _ in good],
                     [-1 if s.label is None else s.label for s, _ in good], f)
            for s, _ in good:
                order.append(s.order), keys.append(s.key), labels.append(-1 if s.label is None else s.label)
        bar.update(len(samples))

    batch, pending = [], None
    try:
        for s in iter_samples(urls, rank, world, problems):
            if s.bad_label or s.data is None:
                problems.add_corrupt(s.key)
                continue
            if s.label is None and require_labels:
                problems.add_unlabelled(s.key)
                continue
            batch.append(s)
            if len(batch) == batch_size:  # decode this batch while the previous one runs
                nxt, batch = submit(batch), []
                if pending:
                    finish(*pending)
                pending = nxt
        if pending:
            finish(*pending)
        if batch:
            finish(*submit(batch))
        local = {"order": order, "key": keys, "label": labels, "problems": problems,
                 "features": torch.cat(chunks) if chunks else None}
        merged = _gather(local, device) if world > 1 else local
        result = _finish(merged, desc or "the shards", urls, expected)
        bar.close()  # "done" only for a split that passed its checks
        return result
    finally:
        bar.close(done=False)
        if pool:
            pool.shutdown()


def _gather(local: dict, device) -> dict:
    """Metadata to every process, features to rank 0 (padded so all tensors have one shape)."""
    import torch.distributed as dist

    rank, world = dist_info()
    feats = local.pop("features")
    local["n"] = len(local["key"])
    local["dim"] = None if feats is None else feats.shape[1]
    metas = [None] * world
    dist.all_gather_object(metas, local)
    dims = {m["dim"] for m in metas if m["dim"] is not None}
    if len(dims) > 1:
        raise EvalError(f"processes produced features of different sizes {sorted(dims)}")
    dim, nmax = (dims.pop() if dims else 0), max(m["n"] for m in metas)
    features = None
    if nmax and dim:
        comm = torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")
        padded = torch.zeros(nmax, dim, device=comm)
        if feats is not None:
            padded[:len(feats)] = feats.to(comm)
        bucket = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
        dist.gather(padded, bucket, dst=0)
        if rank == 0:
            features = torch.cat([b[:m["n"]].cpu() for b, m in zip(bucket, metas)])
    problems = Problems()
    for m in metas:
        problems.merge(m["problems"])
    return {"order": sum((m["order"] for m in metas), []), "key": sum((m["key"] for m in metas), []),
            "label": sum((m["label"] for m in metas), []), "problems": problems, "features": features}


def _finish(parts: dict, desc: str, urls=(), expected: list[int] | None = None) -> dict:
    """Checks (identical on every process) and the one-process order."""
    p: Problems = parts["problems"]
    if p.broken_shards:
        raise EvalError(f"cannot read {len(p.broken_shards)} shard(s) of {desc}: {p.broken_shards[0]}")
    short = [(u, p.shard_counts.get(i, 0), n) for i, (u, n) in enumerate(zip(urls, expected or []))
             if p.shard_counts.get(i, 0) < n]
    if short:  # a split read short would be scored on fewer samples without a word (issue #16)
        url, got, n = short[0]
        raise EvalError(f"{url} yields {got} samples but its index says {n}: the shard is truncated "
                        f"(in {desc}, {len(short)} shard(s) short); copy or write it again")
    if p.unlabelled:
        raise EvalError(f"{p.unlabelled} sample(s) in {desc} have no 'cls' label (e.g. "
                        f"{p.unlabelled_keys[0] if p.unlabelled_keys else '?'}): k-NN and linear probes need labelled shards")
    idx = sorted(range(len(parts["order"])), key=parts["order"].__getitem__)
    keys = [parts["key"][i] for i in idx]
    if len(set(keys)) != len(keys):
        seen, dup = set(), None
        for k in keys:
            if k in seen:
                dup = k
                break
            seen.add(k)
        raise EvalError(f"sample key {dup} appears twice in {desc}: is a shard listed twice?")
    feats = parts["features"]
    if feats is not None:
        feats = feats[torch.as_tensor(idx, dtype=torch.long)] if len(idx) else feats
    return {"key": keys, "label": torch.tensor([parts["label"][i] for i in idx], dtype=torch.long),
            "features": feats, "corrupt": p.corrupt, "corrupt_keys": sorted(p.corrupt_keys),
            "shard": torch.tensor([parts["order"][i][0] for i in idx], dtype=torch.long)}


# ------------------------------------------------------------------------------------ cache ----
def _load(path: Path) -> dict | None:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("version") == CACHE_VERSION and isinstance(data.get("features"), torch.Tensor):
            return data
    except Exception as e:  # a damaged or foreign file: re-extract rather than fail
        print(f"selfsup-eval: warning: ignoring unreadable cache file {path} ({type(e).__name__})",
              file=sys.stderr)
    return None


def _save(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, tmp)
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache costs speed, not the evaluation
        tmp.unlink(missing_ok=True)
        print(f"selfsup-eval: warning: cannot write the feature cache {path} ({e})", file=sys.stderr)


def cached_features(bb: Backbone, urls: list[str], cache_dir: str | None, *, device="cpu",
                    class_names=None, **kw) -> dict:
    """:func:`extract`, served from ``cache_dir`` when this (checkpoint, shards, transform) has
    been extracted before. Rank 0 reads and writes the cache; under torchrun it tells the other
    processes whether to extract, and hands them keys and labels on a hit. Samples whose label
    is not one of the index's ``class_names`` (or beyond ``budgets.MAX_CLASSES``) are dropped and
    counted as corrupt, fresh or cached alike."""
    rank, world = dist_info()
    return drop_out_of_range(_cached_features(bb, urls, cache_dir, rank, world, device=device, **kw),
                             class_limit(class_names), quiet=rank != 0)


def _cached_features(bb: Backbone, urls: list[str], cache_dir: str | None, rank: int, world: int, *,
                     device="cpu", **kw) -> dict:
    path = Path(cache_dir) / f"{cache_key(bb, urls, device)}.pt" if cache_dir else None
    data = _load(path) if path is not None and rank == 0 and path.is_file() else None
    if world > 1:
        import torch.distributed as dist

        meta = [None if data is None else {k: v for k, v in data.items() if k != "features"}]
        dist.broadcast_object_list(meta, src=0)
        if rank != 0 and meta[0] is not None:
            data = {**meta[0], "features": None}
    if data is not None:
        return {k: data[k] for k in ("key", "label", "features", "corrupt", "corrupt_keys", "shard")
                if k in data}  # "shard" (each row's shard index): cache files since issue 28
    feats = extract(bb, urls, device=device, **kw)
    if path is not None and rank == 0:
        _save(path, {"version": CACHE_VERSION, "checkpoint": bb.path, "urls": list(urls),
                     "transform": transform_settings(bb, device), **feats})
    return feats
