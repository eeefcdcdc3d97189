"""Feature extraction, once per (checkpoint, shards, transform), cached on disk.

Protocol: decode, grayscale → 3 channels, resize the shorter side to the checkpoint's
``input_size`` and centre-crop (a no-op for images already that size), scale to [0, 1], normalise
with the checkpoint's mean/std, backbone in eval mode, pooled per its ``pool``; bf16 autocast on
GPU, fp32 on CPU. Under torchrun/accelerate each process embeds every ``world``-th sample of the
stream and the features are gathered and put back in stream order, so 2 processes give exactly
the features of 1.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from selfsup_eval.checkpoint import Backbone, EvalError

CACHE_VERSION = 1
IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "ppm", "bmp")


def dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def preprocess(data: bytes, size: int | None) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        if size is not None and min(img.size) != size:
            w, h = img.size
            s = size / min(w, h)
            img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
        if size is not None and img.size != (size, size):
            w, h = img.size
            left, top = (w - size) // 2, (h - size) // 2
            img = img.crop((left, top, left + size, top + size))
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def iter_samples(urls: list[str], counter: dict):
    """(index, key, label, image bytes) in stream order; corrupt members counted, skipped."""
    from webdataset.tariterators import tarfile_samples

    def handler(exc):
        counter["corrupt"] += 1
        return True

    stream = tarfile_samples(({"url": u} for u in urls), handler=handler)
    for i, s in enumerate(stream):
        data = next((s[k] for k in IMAGE_KEYS if k in s), None)
        label = int(s["cls"].decode()) if "cls" in s else None
        yield i, s["__key__"], label, data


def cache_key(backbone: Backbone, urls: list[str], size) -> str:
    meta = {k: backbone.meta.get(k) for k in ("mean", "std", "pool", "input_size")}
    blob = json.dumps([CACHE_VERSION, backbone.digest, urls, size, meta], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:40]


def _gather(parts: dict) -> dict:
    import torch.distributed as dist

    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, parts)
    merged = {k: sum((p[k] for p in everything), []) for k in ("index", "key", "label")}
    merged["features"] = torch.cat([p["features"] for p in everything])
    order = np.argsort(np.asarray(merged["index"]), kind="stable")
    return {"key": [merged["key"][i] for i in order],
            "label": torch.tensor([merged["label"][i] for i in order]),
            "features": merged["features"][torch.as_tensor(order)],
            "corrupt": sum(p["corrupt"] for p in everything)}


@torch.no_grad()
def extract(backbone: Backbone, urls: list[str], *, batch_size: int = 256, device: str = "cpu",
            desc: str = "") -> dict:
    rank, world = dist_info()
    size = backbone.meta.get("input_size")
    mean = torch.tensor(backbone.meta["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(backbone.meta["std"], device=device).view(1, -1, 1, 1)
    model = backbone.model.to(device) if backbone.model is not None else None
    counter = {"corrupt": 0}
    out = {"index": [], "key": [], "label": [], "features": []}
    batch, meta = [], []

    def flush():
        x = torch.stack(batch).to(device).float() / 255
        x = (x - mean) / std
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda") and model is not None):
            f = backbone.features(x)
        out["features"].append(f.float().cpu())
        for i, k, y in meta:
            out["index"].append(i), out["key"].append(k), out["label"].append(y)
        batch.clear(), meta.clear()

    bar = tqdm(desc=desc, unit="img", disable=rank != 0)
    try:
        for i, key, label, data in iter_samples(urls, counter):
            if i % world != rank:
                continue
            if label is None:
                raise EvalError(f"sample {key} in {desc or 'the shards'} has no 'cls' label: "
                                "k-NN and linear probes need labelled shards")
            try:
                batch.append(preprocess(data, size))
            except Exception:  # undecodable image: skipped and counted
                counter["corrupt"] += 1
                continue
            meta.append((i, key, label))
            bar.update(1)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    finally:
        bar.close()
    feats = torch.cat(out["features"]) if out["features"] else torch.zeros(0, 0)
    parts = {**out, "features": feats, "corrupt": counter["corrupt"]}
    if world > 1:
        return _gather(parts)
    return {"key": parts["key"], "label": torch.tensor(parts["label"]), "features": feats,
            "corrupt": counter["corrupt"]}


def cached_features(backbone: Backbone, urls: list[str], cache_dir: str | None, **kw) -> dict:
    """Features from the cache, or extracted and cached (atomic write by rank 0)."""
    size = backbone.meta.get("input_size")
    path = Path(cache_dir) / f"{cache_key(backbone, urls, size)}.pt" if cache_dir else None
    if path is not None and path.is_file():
        return torch.load(path, weights_only=False)
    feats = extract(backbone, urls, **kw)
    if path is not None and dist_info()[0] == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(feats, tmp)
        os.replace(tmp, path)
    return feats
