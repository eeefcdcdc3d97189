"""GPU figures: img/s and MFU of selfsup's training step, and one Fashion-MNIST epoch.

For each case (SimCLR on ResNet-18 and ResNet-50, I-JEPA on ViT-S/16 and ViT-B/16, all at 224 px,
at the recipes' per-GPU batch or the ``--batch`` sizes given) the module is
built by the trainer's own ``build_model`` from the shipped recipe, prepared by accelerate in bf16
mixed precision, and fed uint8 images already on the device: the step includes the objective's
batched on-device augmentation, forward, backward, optimizer step and EMA, exactly what a run
does per batch (only data loading is left out). Variants: ``model.channels_last`` and
``model.compile`` on and off.

MFU = (FLOPs of one step, counted by ``torch.utils.flop_counter`` on the eager module: matmuls,
convolutions, attention) / step time / the device's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s,
datasheet). The element-wise work of augmentation, norms and the optimizer is not counted, as in
the usual MFU definition.

``--profile N`` adds, per case and batch, where the step's time goes: N steps under the torch
profiler, annotated (``record_function``) as forward, backward, optimizer and EMA, with the
objective's augmentation and I-JEPA's mask drawing inside the forward. For each part: host time
(CPU, the Python and dispatch that queue the work) and device time (the kernels it launched);
``gpu_idle_ms`` = wall time per step minus the device's busy time (one stream: kernels do not
overlap). The annotations are attached here (instance attributes), not in selfsup's code.

``--fmnist DIR`` then trains ``recipes/demo_fmnist.yaml`` for one epoch on the real Fashion-MNIST
shards in DIR with the trainer (data loading included) and prints the epoch's wall time.

    python bench/gpu.py --out bench/results/gpu.jsonl --fmnist data/fashion-mnist
    python bench/gpu.py --cases ijepa-vit_small ijepa-vit_base --batch 64 128 --profile 10   # issue 18

``--allow-cpu`` with ``--override`` (e.g. a tiny ViT) runs the same code on a CPU, to check the
script before it spends GPU time; its figures mean nothing.

One JSON record per measurement is appended to ``--out`` as it is made, so that a run cut short
keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import timed, trainer_step  # noqa: E402

from selfsup.config import load_recipe  # noqa: E402
from selfsup.optim import create_optimizer  # noqa: E402
from selfsup.build import build_model, make_accelerator  # noqa: E402
from selfsup.views import view_size  # noqa: E402

# name: (recipe, overrides, images per step); batch sizes are the recipes' per-GPU ones
CASES = {
    "simclr-resnet18": ("recipes/simclr.yaml", ["model.name=resnet18"], 256),
    "simclr-resnet50": ("recipes/simclr.yaml", [], 256),
    "ijepa-vit_small": ("recipes/ijepa_vit_base.yaml", ["model.name=vit_small_patch16_224"], 128),
    "ijepa-vit_base": ("recipes/ijepa_vit_base.yaml", [], 128),
}
PARTS = ("forward", "augmentation", "masks", "backward", "optimizer", "ema")
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def peak_flops(name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def annotate(obj, method: str, label: str) -> None:
    """``obj.method`` runs inside ``record_function(label)`` (an instance attribute)."""
    fn = getattr(obj, method)

    def wrapped(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)
    setattr(obj, method, wrapped)


def make_step(recipe: str, overrides: list[str], batch: int, channels_last: bool, compile_: bool,
              parts: bool = False):
    """The trainer's step on device-resident uint8 images as a closure; ``parts``: annotated for
    the profiler (PARTS)."""
    cfg = load_recipe(recipe, [*overrides, "train.precision=bf16", f"train.batch_size={batch}",
                               f"model.channels_last={str(channels_last).lower()}",
                               f"model.compile={str(compile_).lower()}"])
    acc = make_accelerator(cfg)
    torch.manual_seed(0)
    objective = build_model(cfg, acc)
    opt = create_optimizer(objective, cfg.optim, 1e-4, acc.device)  # the trainer's (fused on CUDA)
    model, opt = acc.prepare(objective, opt)
    size = cfg.augment.size
    views = objective.views()  # what the loader would deliver: (B, V, 3, S, S) uint8 crops
    shape = (batch, len(views), 3, view_size(views), view_size(views))
    images = torch.randint(0, 256, shape, dtype=torch.uint8, device=acc.device)
    gen = torch.Generator().manual_seed(0)
    if parts:
        annotate(objective.augment, "forward", "augmentation")
        if hasattr(objective, "sample_masks"):
            annotate(objective, "sample_masks", "masks")
    step = trainer_step(acc, opt, objective, lambda: model({"image": images, "epoch": 1.0}, gen)[0],
                        momentum=objective.momentum(0.5), region=record_function if parts else None)
    return step, size


def breakdown(step, steps: int) -> dict:
    """Per step, in ms: host and device time of each part (forward without augmentation and
    masks, which are reported on their own), the device's busy time and its idle time. The wall
    time is taken under the profiler, so it includes the profiler's own overhead."""
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / steps
    events = prof.events()
    host, device = dict.fromkeys(PARTS, 0.0), dict.fromkeys(PARTS, 0.0)
    for e in events:
        if e.name in host and e.device_type == torch.autograd.DeviceType.CPU:
            host[e.name] += e.cpu_time_total / 1e3 / steps
            device[e.name] += e.device_time_total / 1e3 / steps
    for inner in ("augmentation", "masks"):  # inside the forward: counted once
        host["forward"] -= host[inner]
        device["forward"] -= device[inner]
    busy = sum(e.self_device_time_total for e in events
               if e.device_type == torch.autograd.DeviceType.CPU) / 1e3 / steps
    return {"profiled_steps": steps, "wall_ms": round(wall * 1e3, 2),
           "host_ms": {k: round(v, 2) for k, v in host.items()},
           "device_ms": {k: round(v, 2) for k, v in device.items()} if cuda else None,
           "gpu_busy_ms": round(busy, 2) if cuda else None,
           "gpu_idle_ms": round(wall * 1e3 - busy, 2) if cuda else None}


def count_flops(step) -> int:
    with FlopCounterMode(display=False) as fc:
        step()
    return fc.get_total_flops()


def fmnist_epoch(data: str, batch: int, workers: int) -> dict:
    from selfsup.trainer import Trainer
    run = Path("runs/gpu-fmnist-epoch")
    cfg = load_recipe("recipes/demo_fmnist.yaml", [
        f"run.dir={run}", "resume=none", "train.epochs=1", "train.precision=bf16",
        f"train.batch_size={batch}", f"data.num_workers={workers}",
        f"data.train={data}/train.json", f"data.val={data}/test.json", "checkpoint.every_steps=0"])
    trainer = Trainer(cfg)
    t = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t
    images = trainer.state["images_seen"]
    return {"case": "fmnist-epoch", "recipe": "recipes/demo_fmnist.yaml", "batch": batch,
            "workers": workers, "images": images, "epoch_s": round(wall, 2),
            "img_per_s": round(images / wall, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--variants", nargs="+", default=["eager", "compile"], choices=["eager", "compile"],
                   help="eager: with and without channels_last; compile: torch.compile, channels_last")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the device, TFLOP/s")
    p.add_argument("--fmnist", help="folder with Fashion-MNIST train.json/test.json shards")
    p.add_argument("--fmnist-batch", type=int, nargs="+", default=[256])
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--out", type=Path)
    p.add_argument("--batch", type=int, nargs="+", help="per-GPU batch sizes (default: each recipe's)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile N steps per case and batch: where the step's time goes")
    p.add_argument("--override", nargs="+", default=[], help="recipe overrides for every case")
    p.add_argument("--allow-cpu", action="store_true", help="run on a CPU (a check of the script)")
    args = p.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        sys.exit("bench/gpu.py needs a CUDA device (--allow-cpu checks the script on a CPU)")
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    peak = peak_flops(name, args.peak_tflops)
    print(f"device {name}, torch {torch.__version__}, host {platform.node()}, "
          f"peak bf16 {peak / 1e12 if peak else '?'} TFLOP/s", flush=True)

    def record(rec: dict) -> None:
        rec = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), **rec}
        print(json.dumps(rec), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as f:
                f.write(json.dumps(rec) + "\n")

    flops = {}
    # eager with and without channels_last, then compiled in the recipes' format (channels_last
    # for ResNets; a ViT has no 4-D activations to reformat); every eager variant first, so that
    # compile time cannot starve them
    variants = ([(False, False), (True, False)] if "eager" in args.variants else []) + (
        [(True, True)] if "compile" in args.variants else [])
    for channels_last, compile_ in variants:
        for case in args.cases:
            recipe, overrides, default_batch = CASES[case]
            overrides = [*overrides, *args.override]
            cl = channels_last and "vit" not in case
            if cl != channels_last and not compile_:
                continue  # a ViT's eager run is the (False, False) one
            for batch in args.batch or [default_batch]:
                key = (case, batch)
                step, size = make_step(recipe, overrides, batch, cl, compile_, parts=args.profile > 0)
                if key not in flops:  # counted on an eager twin: the counter and compile do not mix
                    flops[key] = count_flops(make_step(recipe, overrides, batch, cl, False)[0]
                                             if compile_ else step)
                t0 = time.perf_counter()
                step()  # first call: compilation, cudnn autotuning
                first = time.perf_counter() - t0
                dt = timed(step, args.warmup, args.iters)
                achieved = flops[key] / dt
                rec = {"case": case, "size": size, "batch": batch, "precision": "bf16",
                       "channels_last": cl, "compile": compile_,
                       "img_per_s": round(batch / dt, 1), "step_ms": round(dt * 1e3, 2),
                       "gflop_per_step": round(flops[key] / 1e9, 1),
                       "tflops": round(achieved / 1e12, 1),
                       "mfu": round(achieved / peak, 4) if peak else None,
                       "first_step_s": round(first, 1),
                       "max_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None}
                if args.profile:
                    rec["breakdown"] = breakdown(step, args.profile)
                record(rec)
                del step
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
    if args.fmnist:
        for batch in args.fmnist_batch:
            record(fmnist_epoch(args.fmnist, batch, args.workers))


if __name__ == "__main__":
    main()
