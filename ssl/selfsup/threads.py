"""Torch threads of a CPU-only run, chosen so that the processes on a machine do not
oversubscribe its cores.

Torch's default is one thread per core in every process, so several training processes on one
machine (torchrun on CPU) would each run as many threads as there are cores. Each process takes
its share instead: ``max(1, cores // local processes)``. The loader workers (one thread each:
torch sets that in its workers) are not subtracted: measured on the 2-core VM (bench/RESULTS.md),
leaving a core to one worker cut ``make demo``'s training from 507 to 291 img/s (its worker is
mostly idle), and even at 224 px with two busy JPEG-decoding workers one main thread fed
73 img/s against 100 with two (CPU-side augmentation). ``SELFSUP_CPU_THREADS`` sets another
count where measurement says so.

Overrides, in order: ``SELFSUP_CPU_THREADS=N``; else an ``OMP_NUM_THREADS`` already set (by the
user, or by ``torchrun``, which sets 1 for several processes) is kept. The choice is also written
to ``OMP_NUM_THREADS``: accelerate otherwise picks its own for several CPU processes without it
and says so ("OMP_NUM_THREADS/MKL_NUM_THREADS unset, we set it at ...") on every rank.
GPU runs keep torch's default: their main process mostly waits on the device.
"""

from __future__ import annotations

import os

ENV = "SELFSUP_CPU_THREADS"


def auto_threads(cores: int, local_processes: int, num_workers: int = 0) -> int:
    """This process's share of the cores (``num_workers``: not subtracted, module docstring)."""
    return max(1, cores // max(1, local_processes))


def choose(num_workers: int) -> tuple[int, str] | None:
    """(threads, why) for this process of a CPU-only run, or None: leave torch as it is."""
    explicit = os.environ.get(ENV, "").strip()
    if explicit:
        if not explicit.isdigit() or int(explicit) < 1:
            from selfsup.errors import RecipeError

            raise RecipeError(f"{ENV}={explicit!r} must be a whole number >= 1")
        return int(explicit), ENV
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    n = auto_threads(cores, local, num_workers)
    return n, f"{cores} cores / {local} process(es) on this machine; {ENV} overrides"


def apply(num_workers: int) -> str | None:
    """Set torch's threads (and OMP_NUM_THREADS) for a CPU-only run; the line to log, or None."""
    import torch

    chosen = choose(num_workers)
    if chosen is None:
        return None
    n, why = chosen
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    return f"cpu: {n} torch thread(s) per process ({why})"
