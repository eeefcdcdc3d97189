"""What a run is built from: the accelerator (devices, precision, CPU threads, DDP settings) and
the model (backbone, objective, memory format, compile, SyncBatchNorm).

One place for the trainer, the multi-process test scripts and ``bench/`` (``gpu.py``,
``cpu_speed.py``, ``train_step.py``), so that a benchmark measures exactly the module a run trains
on exactly the accelerator it gets.
"""

from __future__ import annotations

import inspect
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from omegaconf import OmegaConf

from selfsup import threads as cpu_threads
from selfsup.models import create_backbone
from selfsup.objectives import build_objective


def ddp_kwargs() -> DistributedDataParallelKwargs:
    """DDP does not broadcast rank 0's buffers before every forward pass (per-process BatchNorm
    statistics stay per process, as the methods' split BN expects). torch 2.14 renamed that
    argument ``forward_sync_buffers`` and warns (FutureWarning, once per process) on the old
    ``broadcast_buffers``, the only name accelerate's handler knows; so the new one is passed
    through the handler. Unlike the old one it still syncs buffers once at start, where every
    process holds the same values anyway (the same seed builds the same model everywhere)."""
    handler = DistributedDataParallelKwargs()
    if "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters:
        handler.to_kwargs = lambda: {"forward_sync_buffers": False}
    else:
        handler.broadcast_buffers = False
    return handler


def make_accelerator(cfg) -> Accelerator:
    cpu = cfg.train.cpu or not torch.cuda.is_available()
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if not cpu and torch.cuda.is_bf16_supported() else "fp32"
    note = cpu_threads.apply(cfg.data.num_workers) if cpu else None  # before accelerate looks
    acc = Accelerator(cpu=cpu, mixed_precision="bf16" if precision == "bf16" else "no",
                      kwargs_handlers=[ddp_kwargs()])
    if note:
        acc.print(note)
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if acc.num_processes != expected:
        raise RuntimeError(f"WORLD_SIZE={expected} but accelerate started {acc.num_processes} "
                           "process(es); on CPU launch with `torchrun --nproc_per_node N` "
                           "(`accelerate launch --cpu` starts one process)")
    return acc


def end_distributed(acc: Accelerator) -> None:
    """Every rank waits, then tears the process group down. The wait keeps every rank until rank
    0 has written its export: launchers that kill the rest on the first exit (srun
    --kill-on-bad-exit, torchrun) cut nothing short. The teardown matters too: a torchrun process
    that exits with gloo's (or NCCL's) threads still up can abort ("terminate called without an
    active exception", seen in CI), which turns a finished run into a failed job."""
    acc.wait_for_everyone()
    acc.end_training()


def build_model(cfg, acc: Accelerator):
    """The recipe's backbone wrapped by its objective, with the recipe's memory format,
    ``torch.compile`` and (several GPUs, BatchNorm) SyncBatchNorm: one place for the trainer and
    ``bench/gpu.py``, so that a benchmark measures exactly the module a run trains."""
    backbone = create_backbone(cfg.model.name, OmegaConf.to_container(cfg.model.kwargs),
                               cfg.model.small_stem, cfg.model.zero_init_last)
    objective = build_objective(cfg, backbone)
    if cfg.model.channels_last:
        objective = objective.to(memory_format=torch.channels_last)
        backbone.register_forward_pre_hook(
            lambda m, args: (args[0].contiguous(memory_format=torch.channels_last),) + args[1:])
    if cfg.model.compile:
        objective.compile_step()  # the backbone's entry method, or what the objective says
    if acc.num_processes > 1 and acc.device.type == "cuda" and any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in objective.modules()):
        objective = objective.sync_batchnorm()  # SyncBatchNorm, unless the method says otherwise
    return objective
