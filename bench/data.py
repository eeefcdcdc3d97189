"""CPU cost of feeding SimCLR: two augmented views per image, selfsup vs ImageFolder + lightly.

Paths, each over the same ``--images`` photos and with the same ``--workers`` DataLoader workers
(one-off set-up, e.g. CUDA's and nvJPEG's, is done before timing):

* ``lightly``: ``torchvision.datasets.ImageFolder`` + lightly's ``SimCLRTransform(input_size=SIZE)``
  in the workers (PIL per image: full decode, 2 x RandomResizedCrop, flip, colour jitter, grayscale,
  blur, to tensor, normalise), batches collated: what users run today.
* ``selfsup_cpu``: ``ShardLoader(decode="cpu")`` with two ``ViewSpec(SIZE, (0.08, 1), (3/4, 4/3))``
  views: the workers decode each JPEG only as far as its crops need (DCT scaling) and cut both views
  as uint8. This is all the CPU pays in the trainer's way, where flips, colour and blur
  (``BatchAugment``) run on the GPU. ``selfsup_cpu_plus_cpu_augment`` (informational) adds
  ``BatchAugment`` for both views on the CPU in the main process: a CPU-only machine.
* ``selfsup_gpu`` (only when CUDA is available, else null): ``ShardLoader(decode="device")``, whose
  workers only read bytes and headers; ``to_device(batch, "cuda")`` decodes the JPEGs with nvJPEG
  and cuts the views with ``roi_align``, then ``BatchAugment`` runs on both views on the GPU. Each
  batch waits for the GPU on a *blocking* CUDA event: ``torch.cuda.synchronize()`` spin-waits, which
  would bill the GPU's time as CPU time of the main process.

CPU time = user + system time of the main process (torch's default threads, or ``--threads``) and
of its finished DataLoader workers (``getrusage`` SELF + CHILDREN; workers are joined at the end of
each pass), per image, for both views; img/s is wall clock. ``cores_needed`` = rate x CPU ms / 1000:
the cores a path needs to keep up with SimCLR training on one H200 (bf16, synthetic input,
bench/RESULTS.md): ResNet-50 at 2359 img/s, ResNet-18 at 3963 img/s. Goals: ``selfsup_cpu`` >= 2.5x cheaper per image than ``lightly``
(``cpu_ratio_lightly_over_selfsup``); ``selfsup_gpu`` < 1 CPU core-ms per image.

Data (untimed, in a temporary folder): N = ``--images`` files, either the first N images of
``--shards`` (bytes unchanged; class folder = label or "0"), or the first N files of the ImageFolder
``--folder``, or, by default, N ImageNet-shaped JPEGs from real photos (bench/imagenet_like.py).
They are written as an ImageFolder (the lightly path) and by ``selfsup-shards`` (original bytes
kept; one shard per worker) as shards (the selfsup paths), so every path reads the same bytes.

    python bench/data.py [--images 1000] [--size 224] [--workers 8] [--batch-size 64] [--json]
    python bench/data.py --shards /data/imagenet/train.json --images 5000 --workers 8 --json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import lightly
import PIL
import torch
import torchvision
from lightly.transforms import SimCLRTransform
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.io import decode_jpeg
from webdataset.tariterators import tarfile_samples

from selfsup.augment import BatchAugment
from selfsup.data import ShardLoader
from selfsup.decode import crop_resize
from selfsup.shard_writer import main as shards_main
from selfsup_io.shards import resolve_shards
from selfsup.views import ViewSpec
from selfsup_io import IMAGE_EXTS, BadLabel, label_member, member

RATES = {"resnet50_2359": 2359, "resnet18_3963": 3963}  # SimCLR img/s on one H200 (RESULTS.md)
JITTER = {"brightness": 0.8, "contrast": 0.8, "saturation": 0.8, "hue": 0.2}  # = SimCLRTransform's


def cpu_seconds() -> tuple[float, float]:
    """(main process + waited-for children, main process alone) user + system seconds."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    main = me.ru_utime + me.ru_stime
    return main + kids.ru_utime + kids.ru_stime, main


def measure(name: str, batches, n: int) -> dict:
    """Drain ``batches`` (a generator of batch sizes) and account its wall and CPU time."""
    (c0, m0), t0 = cpu_seconds(), time.perf_counter()
    seen = sum(batches)
    wall, (c1, m1) = time.perf_counter() - t0, cpu_seconds()
    assert seen >= 0.9 * n, f"{name} saw {seen} of {n} images (lower --batch-size)"
    print(f"  {name}: {seen} images, {wall:.1f} s", file=sys.stderr)
    return {"images": seen, "wall_s": round(wall, 2), "img_per_s": round(seen / wall, 1),
            "cpu_ms_per_image": round(1000 * (c1 - c0) / seen, 3),
            "main_cpu_ms_per_image": round(1000 * (m1 - m0) / seen, 3)}


def lightly_batches(folder: Path, n: int, args):
    ds = ImageFolder(str(folder), transform=SimCLRTransform(input_size=args.size))
    assert len(ds) == n, (len(ds), n)
    loader = DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers, shuffle=True)
    for (v0, v1), _ in loader:
        yield len(v0)


def selfsup_batches(spec: str, n: int, args, decode: str, device: str | None):
    """Batches of two views; ``device``: also run BatchAugment on both views there."""
    view = ViewSpec(args.size, (0.08, 1.0), (3 / 4, 4 / 3))
    loader = ShardLoader(spec, batch_size=args.batch_size, views=[view, view], decode=decode,
                         num_workers=args.workers, shuffle_buffer=args.shuffle_buffer,
                         samples_per_epoch=n)
    aug, g = BatchAugment(args.size, **JITTER), torch.Generator().manual_seed(0)
    for batch in loader.epoch(0):
        if device is not None:
            images = loader.to_device(batch, device)["image"]
            views = [aug(images[:, v], g) for v in range(images.shape[1])]
            if device == "cuda":
                done = torch.cuda.Event(blocking=True)
                done.record()
                done.synchronize()
            del views
        yield len(batch["label"])


def warm_up(folder: Path, args, device: str) -> None:
    """One-off costs a long run pays once, before timing: kernel set-up of BatchAugment's shapes
    and, on CUDA, the context and the nvJPEG handle."""
    if device == "cuda":
        jpeg = next(b for p in sorted(folder.rglob("*.*")) if (b := p.read_bytes())[:2] == b"\xff\xd8")
        data = torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)
        image = decode_jpeg([data, data], device=device)[0]
        crop_resize(image, torch.tensor([[0.0, 0.0, 32.0, 32.0]] * 2, dtype=torch.float64), args.size)
    x = torch.zeros(args.batch_size, 3, args.size, args.size, dtype=torch.uint8, device=device)
    BatchAugment(args.size, **JITTER)(x, torch.Generator().manual_seed(0))
    if device == "cuda":
        torch.cuda.synchronize()


def extract_folder(spec: str, n: int, out: Path) -> int:
    """The first ``n`` images of the shards as ``out/LABEL/NNNNNNN.EXT`` (bytes unchanged)."""
    count = 0
    for sample in tarfile_samples({"url": u} for u in resolve_shards(spec, ("train",)).urls):
        ext = next((e for e in IMAGE_EXTS if isinstance(member(sample, e), bytes)), None)
        if ext is None:
            continue
        try:
            label = label_member(sample)
        except BadLabel:
            label = None
        path = out / str(0 if label is None else label) / f"{count:07d}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(member(sample, ext))
        count += 1
        if count == n:
            break
    return count


def copy_first(folder: Path, n: int, out: Path) -> int:
    """The first ``n`` images of an ImageFolder (its own order), copied to ``out/CLASS/``."""
    samples = ImageFolder(str(folder), loader=lambda path: path).samples[:n]
    for path, _ in samples:
        dest = out / Path(path).parent.name / Path(path).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    return len(samples)


def prepare(args, tmp: Path) -> tuple[str, Path, int]:
    """(shard spec, image folder, N): the same N files as an ImageFolder and as shards (untimed)."""
    images = tmp / "images"
    if args.shards:
        n = extract_folder(args.shards, args.images, images)
    elif args.folder:
        n = copy_first(args.folder, args.images, images)
    else:
        from imagenet_like import write_folder

        n = len(write_folder(images, args.images, seed=0))
    # at least one shard per worker, as in a real data set (a worker then reads only its shards)
    size = -(-n // max(1, args.workers))
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the result
        shards_main([str(images), str(tmp / "shards"), "--split", "train", "--shard-size", str(size)])
    if args.warmup:
        for path in [*(tmp / "shards").glob("*.tar"), *images.rglob("*.*")]:
            path.read_bytes()  # into the page cache
    return str(tmp / "shards" / "train.json"), images, n


def setup_info(args, n: int, load: float) -> dict:
    return {"images": n, "size": args.size, "views": 2, "workers": args.workers,
            "batch_size": args.batch_size, "shuffle_buffer": args.shuffle_buffer,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "load_avg_1min_at_start": round(load, 2),
            "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
            "cpu": platform.processor() or platform.machine(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "data": str(args.shards or args.folder or "bench/imagenet_like.py"),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "PIL": PIL.__version__,
            "lightly": lightly.__version__,
            "date": datetime.date.today().isoformat()}


def run(args) -> dict:
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        spec, folder, n = prepare(args, Path(tmp))
        runs = {"lightly": lambda: lightly_batches(folder, n, args),
                "selfsup_cpu": lambda: selfsup_batches(spec, n, args, "cpu", None),
                "selfsup_cpu_plus_cpu_augment": lambda: selfsup_batches(spec, n, args, "cpu", "cpu"),
                "selfsup_gpu": lambda: selfsup_batches(spec, n, args, "device", "cuda")}
        for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
            warm_up(folder, args, device)
        if not torch.cuda.is_available():
            del runs["selfsup_gpu"]
        paths = {name: measure(name, batches(), n) for name, batches in runs.items()}
    paths.setdefault("selfsup_gpu", None)
    cores = {key: {name: p and round(rate * p["cpu_ms_per_image"] / 1000, 2) for name, p in paths.items()}
             for key, rate in RATES.items()}
    ratio = paths["lightly"]["cpu_ms_per_image"] / paths["selfsup_cpu"]["cpu_ms_per_image"]
    gpu = paths["selfsup_gpu"]
    return {"paths": paths, "cores_needed": cores, "cpu_ratio_lightly_over_selfsup": round(ratio, 2),
            "goals": {"cpu_ratio_at_least_2.5": ratio >= 2.5,
                      "gpu_cpu_ms_under_1": gpu and gpu["cpu_ms_per_image"] < 1},
            "setup": setup_info(args, n, load)}


def table(result: dict) -> str:
    r50, r18 = (result["cores_needed"][k] for k in RATES)
    rows = ["| path | img/s (wall) | CPU ms / image | cores for R50 @2359 | cores for R18 @3963 |",
            "|---|---|---|---|---|"]
    for name, p in result["paths"].items():
        rows.append(f"| {name} | – | – | – | – |" if p is None else
                    f"| {name} | {p['img_per_s']:.0f} | {p['cpu_ms_per_image']:.2f} | "
                    f"{r50[name]:.1f} | {r18[name]:.1f} |")
    rows.append(f"\nlightly / selfsup_cpu CPU per image: {result['cpu_ratio_lightly_over_selfsup']:.2f}x "
                "(goal >= 2.5)\nsetup: " + ", ".join(f"{k} {v}" for k, v in result["setup"].items()))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--shards", help="take the first N images of these shards")
    src.add_argument("--folder", type=Path, help="take the first N images of this ImageFolder")
    p.add_argument("--images", type=int, default=1000, help="N images per path")
    p.add_argument("--size", type=int, default=224, help="side of each view")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shuffle-buffer", type=int, default=2000, help="ShardLoader's (trainer default)")
    p.add_argument("--threads", type=int, help="torch threads of the main process (default: torch's)")
    p.add_argument("--warmup", action="store_true", help="read the data once, untimed (page cache)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    print(json.dumps(result, indent=1) if args.json else table(result))


if __name__ == "__main__":
    main()
