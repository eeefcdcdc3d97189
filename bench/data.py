"""Data pipeline cost: two augmented SimCLR views per image, selfsup vs torchvision ImageFolder +
lightly's ``SimCLRTransform``, on the same images with the same number of workers.

Paths measured (each over the same ``--images`` JPEGs, written once, untimed, both as an image
folder and as selfsup shards):

* ``lightly``: ``torchvision.datasets.ImageFolder`` + ``lightly.transforms.SimCLRTransform``
  (PIL, per image: decode, 2 x RandomResizedCrop, flip, colour jitter, grayscale, blur, to tensor,
  normalise) in ``--workers`` DataLoader workers, batches collated.
* ``selfsup (CPU aug)``: selfsup's shard stream (decode + shorter-side resize + centre crop to
  ``--decode-size`` uint8 in the workers) and :class:`selfsup.augment.BatchAugment` for the two
  views on the whole batch, here on the CPU (the worst case: a CPU-only machine).
* ``selfsup (decode only)``: the same stream without augmentation: what the CPU pays per image when
  the batch is augmented on the GPU (the trainer's default on a GPU machine; the GPU's share is
  measured on a GPU by ``--device cuda``).

Figures: wall images/s and **CPU seconds per image** (user + system time of the main process and
its workers, from ``getrusage``), so "images per CPU-core second" = 1 / that.

    python bench/data.py [--images 2048] [--image-size 256] [--crop 224] [--workers 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import io
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def write_images(root: Path, n: int, size: int) -> None:
    """Photo-like JPEGs (smooth colour fields + texture), 10 classes, as an ImageFolder tree."""
    rng = np.random.default_rng(0)
    for i in range(n):
        low = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((size, size), Image.BICUBIC)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-20, 20, (size, size, 3))
        d = root / "images" / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(d / f"{i:06d}.jpg", quality=90)


def measure(name: str, batches, n_images: int) -> dict:
    t0, c0 = time.perf_counter(), cpu_seconds()
    seen = 0
    for b in batches:
        seen += b
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    assert seen >= n_images * 0.9, (name, seen)
    return {"path": name, "images": seen, "img_per_s": seen / wall, "cpu_ms_per_img": 1000 * cpu / seen}


def lightly_path(root: Path, args):
    from lightly.transforms import SimCLRTransform
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(root / "images"), transform=SimCLRTransform(input_size=args.crop))
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers,
                                         shuffle=True, drop_last=False)
    for (v0, v1), _ in loader:
        yield len(v0)


def selfsup_path(shards: str, args, augment: bool):
    from selfsup.augment import BatchAugment
    from selfsup.data import ShardLoader

    loader = ShardLoader(shards, batch_size=args.batch_size, num_workers=args.workers,
                         decode_size=args.decode_size, shuffle_buffer=512)
    aug = BatchAugment(size=args.crop, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2).to(args.device)
    g = torch.Generator().manual_seed(0)
    for batch in loader.epoch(0):
        images = batch["image"].to(args.device, non_blocking=True)
        if augment:
            v0, v1 = aug(images, g), aug(images, g)
            if args.device == "cuda":
                torch.cuda.synchronize()
        yield len(images)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--image-size", type=int, default=256, help="side of the stored JPEGs")
    p.add_argument("--decode-size", type=int, default=256, help="selfsup's decode size (uint8)")
    p.add_argument("--crop", type=int, default=224, help="view size")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from selfsup.shards import main as shards_main

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_images(root, args.images, args.image_size)
        shards_main([str(root / "images"), str(root / "shards"), "--split", "train"])
        spec = str(root / "shards" / "train.json")
        for _ in selfsup_path(spec, args, augment=False):  # warm the page cache for both paths
            pass
        rows = [measure("lightly: ImageFolder + SimCLRTransform", lightly_path(root, args), args.images),
                measure(f"selfsup: shards + BatchAugment on {args.device}", selfsup_path(spec, args, True), args.images),
                measure("selfsup: shards, decode only (augment on GPU)", selfsup_path(spec, args, False), args.images)]
    base = rows[0]
    print(f"{args.images} JPEGs {args.image_size}px -> 2 views {args.crop}px, {args.workers} workers, "
          f"batch {args.batch_size}, torch threads {torch.get_num_threads()}")
    print("| path | img/s (wall) | CPU ms / image | lightly CPU / this CPU |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['img_per_s']:.0f} | {r['cpu_ms_per_img']:.2f} | "
              f"{base['cpu_ms_per_img'] / r['cpu_ms_per_img']:.2f} |")


if __name__ == "__main__":
    main()
