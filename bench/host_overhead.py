"""Host overhead per training step: the Python time of trainer + objective + augmentation
dispatch + optimizer, measured on the CPU with models so small that their compute is negligible.

On a GPU the host only queues kernels; if queuing a step takes longer than the GPU needs to run
it, the GPU idles. A GPU step of the recipes takes ~65-250 ms on an H200 (bench/RESULTS.md), so
the host's share must stay small next to that (goal: <= 5 ms per step for SimCLR and I-JEPA).

The real trainer (:class:`selfsup.trainer.Trainer`) runs on tiny shards written here, in one
process (``data.num_workers=0``); each step is timed from one batch fetch to the next with the
fetch itself (reading, decoding, cutting views: a real run does it in loader workers) left out.
The figure is the median over the steps of the thread's CPU time (wall time alongside). On the
CPU the ops' compute runs on that thread too, so it is an upper bound of the host's share; the
number of ATen operators one step dispatches (one step counted) is what a GPU's host pays for
per kernel launch. The cases keep their recipe's depth (the test ResNet, ResNet-18; ViT-B/16's 12
blocks and the recipe's 12 predictor blocks) at tiny width or on tiny images; batch 2 and 8 show
how much of the figure is still compute. One torch thread: on a shared 2-core VM two threads
wait for each other at every op (a descheduled OpenMP thread cost ~20 ms per op in a first try),
which is not host overhead.

    python bench/host_overhead.py                     # every case, JSON lines on stdout
    python bench/host_overhead.py --case ijepa-vitb-depth --profile 25   # cProfile, top 25
"""

from __future__ import annotations

import argparse
import contextlib
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
from torch.utils._python_dispatch import TorchDispatchMode

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
    # I-JEPA recipe: 12 encoder blocks (ViT-B/16) and its 12 predictor blocks, width 32, 8x8 patch grid
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
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON lines
        write_shards_main([str(npz), str(out), "--split", "train", "--shard-size", "64"])
    return out / "train.json"


class OpCounter(TorchDispatchMode):
    """ATen operators dispatched (on a GPU: about one kernel launch each, a few µs of host time
    apiece however small the tensors)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


class StepClock:
    """Wraps the trainer's batch stream: each ``next()`` marks the end of one step and the start
    of the next, so consecutive marks bound exactly one step (data fetch included, subtracted).
    CPU time is this thread's (``time.thread_time``; torch runs its CPU ops on the calling thread
    with one thread): on a shared VM, other processes' load stretches wall time, not CPU time."""

    def __init__(self, stream, count_step: int):
        self.stream = stream
        self.marks: list[tuple[float, float, float, float]] = []  # (cpu, wall) before and after fetch
        self.count_step, self.counter = count_step, OpCounter()

    def __iter__(self):
        return self

    def __next__(self):
        c0, w0 = time.thread_time(), time.perf_counter()
        if len(self.marks) == self.count_step + 1:  # the counted step is over
            self.counter.__exit__(None, None, None)
        batch = next(self.stream)
        if len(self.marks) == self.count_step:  # count the dispatches of this step (not timed)
            self.counter.__enter__()
        self.marks.append((c0, w0, time.thread_time(), time.perf_counter()))
        return batch

    def per_step(self, skip: int) -> tuple[list[float], list[float]]:
        """(CPU ms, wall ms) of each step after the first ``skip``, data fetch excluded."""
        cpu, wall = [], []
        for i, ((_, _, c_start, w_start), (c_end, w_end, _, _)) in enumerate(zip(self.marks, self.marks[1:])):
            if i >= skip and i != self.count_step:  # step i runs between fetches i and i + 1
                cpu.append(1000 * (c_end - c_start))
                wall.append(1000 * (w_end - w_start))
        return cpu, wall


def measure(case: str, batch: int, steps: int, window: int, workdir: Path, profile: int = 0) -> dict:
    from selfsup.trainer import Trainer

    recipe, overrides, size = CASES[case]
    shards = write_shards(workdir / "shards", 256, size)
    run = workdir / f"{case}-{batch}"
    cfg = load_recipe(str(ROOT / recipe), [*COMMON, *overrides, f"data.train={shards}", f"run.dir={run}",
                                           f"train.batch_size={batch}", f"train.max_steps={steps + 1}",
                                           f"train.log_every={window}", "resume=none"])
    trainer = Trainer(cfg)
    clocks = []
    batches = trainer.batches

    def clocked():
        clocks.append(StepClock(batches(), count_step=min(10, steps // 4)))
        return clocks[-1]

    trainer.batches = clocked
    prof = cProfile.Profile() if profile else None
    t = time.perf_counter()
    if prof:
        prof.enable()
    trainer.train()
    if prof:
        prof.disable()
    wall = time.perf_counter() - t
    cpu_ms, wall_ms = clocks[0].per_step(skip=min(10, steps // 4) + 1)  # the first steps warm up
    if prof:
        prof.dump_stats(str(workdir / f"{case}-{batch}.prof"))
        stats = pstats.Stats(prof, stream=sys.stderr).strip_dirs().sort_stats("tottime")
        stats.print_stats(profile)
    return {"case": case, "batch": batch, "steps_timed": len(cpu_ms),
            "host_cpu_ms_per_step": round(float(np.median(cpu_ms)), 2),
            "host_cpu_ms_min": round(min(cpu_ms), 2),
            "host_wall_ms_per_step": round(float(np.median(wall_ms)), 2),
            "aten_ops_per_step": clocks[0].counter.ops,
            "profiled": bool(profile), "run_wall_s": round(wall, 1), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
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
