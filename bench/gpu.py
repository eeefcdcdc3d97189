"""GPU figures: img/s and MFU of selfsup's training step, and one Fashion-MNIST epoch.

For each case (SimCLR on ResNet-18 and ResNet-50, I-JEPA on ViT-S/16, all at 224 px) the module is
built by the trainer's own ``build_model`` from the shipped recipe, prepared by accelerate in bf16
mixed precision, and fed uint8 images already on the device: the step includes the objective's
batched on-device augmentation, forward, backward, optimizer step and EMA, exactly what a run
does per batch (only data loading is left out). Variants: ``model.channels_last`` and
``model.compile`` on and off.

MFU = (FLOPs of one step, counted by ``torch.utils.flop_counter`` on the eager module: matmuls,
convolutions, attention) / step time / the device's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s,
datasheet). The element-wise work of augmentation, norms and the optimizer is not counted, as in
the usual MFU definition.

``--fmnist DIR`` then trains ``recipes/demo_fmnist.yaml`` for one epoch on the real Fashion-MNIST
shards in DIR with the trainer (data loading included) and prints the epoch's wall time.

    python bench/gpu.py --out bench/results/gpu.jsonl --fmnist data/fashion-mnist

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
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import timed, trainer_step  # noqa: E402

from selfsup.config import load_recipe  # noqa: E402
from selfsup.optim import create_optimizer  # noqa: E402
from selfsup.trainer import build_model, make_accelerator  # noqa: E402
from selfsup.views import view_size  # noqa: E402

# name: (recipe, overrides, images per step); batch sizes are the recipes' per-GPU ones
CASES = {
    "simclr-resnet18": ("recipes/simclr.yaml", ["model.name=resnet18"], 256),
    "simclr-resnet50": ("recipes/simclr.yaml", [], 256),
    "ijepa-vit_small": ("recipes/ijepa_vit_base.yaml", ["model.name=vit_small_patch16_224"], 128),
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def peak_flops(name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def make_step(recipe: str, overrides: list[str], batch: int, channels_last: bool, compile_: bool):
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
    step = trainer_step(acc, opt, objective, lambda: model({"image": images, "epoch": 1.0}, gen)[0],
                        momentum=objective.momentum(0.5))
    return step, size


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
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA device")
    name = torch.cuda.get_device_name()
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
            recipe, overrides, batch = CASES[case]
            cl = channels_last and "vit" not in case
            if cl != channels_last and not compile_:
                continue  # a ViT's eager run is the (False, False) one
            step, size = make_step(recipe, overrides, batch, cl, compile_)
            if case not in flops:  # counted on an eager twin: the counter and compile do not mix
                flops[case] = count_flops(make_step(recipe, overrides, batch, cl, False)[0]
                                          if compile_ else step)
            t0 = time.perf_counter()
            step()  # first call: compilation, cudnn autotuning
            first = time.perf_counter() - t0
            dt = timed(step, args.warmup, args.iters)
            achieved = flops[case] / dt
            record({"case": case, "size": size, "batch": batch, "precision": "bf16",
                    "channels_last": cl, "compile": compile_,
                    "img_per_s": round(batch / dt, 1), "step_ms": round(dt * 1e3, 2),
                    "gflop_per_step": round(flops[case] / 1e9, 1),
                    "tflops": round(achieved / 1e12, 1),
                    "mfu": round(achieved / peak, 4) if peak else None,
                    "first_step_s": round(first, 1),
                    "max_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)})
            del step
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    if args.fmnist:
        for batch in args.fmnist_batch:
            record(fmnist_epoch(args.fmnist, batch, args.workers))


if __name__ == "__main__":
    main()
