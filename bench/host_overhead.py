"""Host overhead per training step: the Python time of trainer + objective + augmentation
dispatch + optimizer, measured on the CPU with models so small that their compute is negligible.

On a GPU the host only queues kernels; if queuing a step takes longer than the GPU needs to run
it, the GPU idles. A GPU step of the recipes takes ~65-250 ms on an H200 (bench/RESULTS.md), so
the host's share must stay small next to that (goal: <= 5 ms per step for SimCLR and I-JEPA).

The real trainer (:class:`selfsup.trainer.Trainer`) runs on tiny shards written here, in one
process (``data.num_workers=0``). Host time per step = step wall time x (1 - data_wait): the
trainer already times its wait for data (reading, decoding, cutting views), which a real run
does in loader workers, so it is left out. Each case keeps its recipe's depth (ResNet-18/50 and
ViT-B/16 + the 6-block predictor have that many modules to dispatch) where ``--deep`` is given,
at tiny width or tiny images, and batch 2 and 8 show that compute is negligible where the
two agree. One torch thread by default: on a shared 2-core VM two threads wait for each other at
every op (a descheduled OpenMP thread cost ~20 ms per op in a first try), which is not host
overhead.

    python bench/host_overhead.py                     # every case, JSON lines on stdout
    python bench/host_overhead.py --case ijepa-vitb-depth --profile 25   # cProfile, top 25
"""

from __future__ import annotations

import argparse
import cProfile
import json
import platform
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from selfsup.config import load_recipe
from selfsup.shard_writer import main as write_shards_main

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["data.num_workers=0", "data.shuffle_buffer=64", "train.precision=fp32", "train.cpu=true",
          "checkpoint.every_steps=0", "model.channels_last=false", "optim.warmup_epochs=0"]
# name: (recipe, overrides, image side)
CASES = {
    # SimCLR recipe (LARS, DCL/InfoNCE, full colour augmentation with blur) on timm's test ResNet
    "simclr-test_resnet": ("recipes/simclr.yaml", ["model.name=test_resnet", "augment.size=16",
                                                   "objective.proj_hidden_dim=64", "objective.proj_dim=32"], 16),
    # ... on ResNet-18 (the module count of a real backbone), 16 px images
    "simclr-resnet18": ("recipes/simclr.yaml", ["model.name=resnet18", "augment.size=16",
                                                "objective.proj_hidden_dim=64", "objective.proj_dim=32"], 16),
    # I-JEPA recipe: 12 encoder blocks and 6 predictor blocks as ViT-B/16, width 32, 8x8 patch grid
    "ijepa-vitb-depth": ("recipes/ijepa_vit_base.yaml", [
        "model.name=vit_base_patch16_224", "model.kwargs.img_size=16", "model.kwargs.patch_size=2",
        "model.kwargs.embed_dim=32", "model.kwargs.num_heads=2", "augment.size=16",
        "objective.pred_dim=16", "objective.min_keep=4"], 16),
}


def write_shards(out: Path, n: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    npz = out / "src.npz"
    out.mkdir(parents=True, exist_ok=True)
    np.savez(npz, images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
             labels=np.arange(n) % 4, class_names=np.array([f"c{i}" for i in range(4)]))
    write_shards_main([str(npz), str(out), "--split", "train", "--shard-size", "64"])
    return out / "train.json"


def measure(case: str, batch: int, steps: int, window: int, workdir: Path, profile: int = 0) -> dict:
    from selfsup.trainer import Trainer

    recipe, overrides, size = CASES[case]
    shards = write_shards(workdir / "shards", 256, size)
    run = workdir / f"{case}-{batch}"
    cfg = load_recipe(str(ROOT / recipe), [*COMMON, *overrides, f"data.train={shards}", f"run.dir={run}",
                                           f"train.batch_size={batch}", f"train.max_steps={steps}",
                                           f"train.log_every={window}", "resume=none"])
    trainer = Trainer(cfg)
    prof = cProfile.Profile() if profile else None
    t = time.perf_counter()
    if prof:
        prof.enable()
    trainer.train()
    if prof:
        prof.disable()
    wall = time.perf_counter() - t
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "img_per_s" in r][1:]  # the first window warms up
    step_ms = [1000 * trainer.global_batch / r["img_per_s"] for r in records]
    host_ms = [s * (1 - r["data_wait"]) for s, r in zip(step_ms, records)]
    if prof:
        prof.dump_stats(str(workdir / f"{case}-{batch}.prof"))
        stats = pstats.Stats(prof, stream=sys.stderr).strip_dirs().sort_stats("tottime")
        stats.print_stats(profile)
        stats.print_callers(profile)
    return {"case": case, "batch": batch, "steps_timed": len(records) * window,
            "host_ms_per_step": round(float(np.median(host_ms)), 2),
            "host_ms_min": round(min(host_ms), 2), "step_ms": round(float(np.median(step_ms)), 2),
            "data_wait": round(float(np.median([r["data_wait"] for r in records])), 3),
            "wall_s": round(wall, 1), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d", time.gmtime())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--batch", nargs="+", type=int, default=[2, 8])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--window", type=int, default=20, help="steps per log window (one timing each)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: the host's one Python thread; more threads on a "
                        "shared VM wait on each other at every op)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="cProfile the run and print the N functions with the most own time (stderr)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.case:
            for batch in args.batch:
                print(json.dumps(measure(case, batch, args.steps, args.window, Path(tmp), args.profile)),
                      flush=True)


if __name__ == "__main__":
    main()
