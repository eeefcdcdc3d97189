"""Schedules and EMA shared by every objective (the trainer applies them; objectives only
declare what they need).

All schedules are pure functions of the optimizer step, so resuming needs nothing but the step:
the learning-rate schedule cannot restart by accident (lightly-train #301).
"""

from __future__ import annotations

import logging
import math

import torch
from timm.scheduler import CosineLRScheduler


def scaled_lr(base_lr: float, global_batch: int, rule: str) -> float:
    """Learning rate for ``global_batch`` given one tuned for 256 (Goyal et al. linear rule)."""
    if rule == "linear":
        return base_lr * global_batch / 256
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch / 256)
    if rule == "none":
        return base_lr
    raise ValueError(f"optim.lr_scaling must be linear, sqrt or none, not {rule!r}")


def lr_scheduler(optimizer, total_steps: int, warmup_steps: int, warmup_lr: float,
                 min_lr: float) -> CosineLRScheduler:
    """Linear warm-up from ``warmup_lr``, then a cosine from the peak to ``min_lr``, stepped per
    optimizer update (``step_update(step)``; timm's scheduler).

    The cosine starts at the peak when the warm-up ends and spans the remaining steps, as SimCLR's,
    I-JEPA's and DINO's official schedules (``warmup_prefix``). timm's default shape instead runs
    one cosine over the whole run whose first steps the warm-up replaces, so every later step sees
    a lower rate (I-JEPA's 40 of 300 warm-up epochs: 21 % lower at epoch 170)."""
    after = warmup_steps > 0
    t_initial = max(1, total_steps - warmup_steps if after else total_steps)
    # a cosine of one step (a 1-step run, or a warm-up that covers the run) makes timm log "Cosine
    # annealing scheduler will have no effect": true and harmless, and the trainer says in its
    # own words when the warm-up covers the run, so timm's line is held back here
    quiet = logging.getLogger("timm.scheduler.cosine_lr")
    level = quiet.level
    if t_initial == 1:
        quiet.setLevel(logging.ERROR)
    try:
        return CosineLRScheduler(optimizer, t_initial=t_initial, lr_min=min_lr, warmup_t=warmup_steps,
                                 warmup_lr_init=warmup_lr, warmup_prefix=after, t_in_epochs=False)
    finally:
        quiet.setLevel(level)


def cosine(start: float, end: float, progress: float) -> float:
    """Cosine interpolation from ``start`` (progress 0) to ``end`` (progress 1)."""
    progress = min(max(progress, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def set_weight_decay(optimizer, base: float, end: float | None, progress: float) -> float:
    """Cosine weight-decay schedule (I-JEPA raises it 0.04 → 0.4). Groups created without weight
    decay (biases, norms) keep zero; the others are scaled together."""
    wd = base if end is None else cosine(base, end, progress)
    for group in optimizer.param_groups:
        if group.setdefault("initial_weight_decay", group["weight_decay"]) > 0:
            group["weight_decay"] = wd
    return wd


class EMA:
    """target ← m·target + (1−m)·online over ``(online, target)`` module pairs, for parameters
    and floating buffers (BN statistics; integer buffers are copied).

    The tensors are gathered once: walking a module tree for its parameters costs Python time per
    module (a ViT-B-deep encoder: ~6 ms per step under cProfile in bench/host_overhead.py). The update is
    one multi-tensor ``_foreach_lerp_`` (as timm's ``ModelEmaV3``), not one lerp per tensor. Build
    it after the modules have moved to their device (``.to`` replaces buffers; loading a state
    dict copies into the same tensors, so a resume keeps it valid)."""

    def __init__(self, pairs):
        self.dst, self.src, self.copies = [], [], []
        for online, target in pairs:
            for po, pt in zip(online.parameters(), target.parameters()):
                self.dst.append(pt)
                self.src.append(po)
            for bo, bt in zip(online.buffers(), target.buffers()):
                if bt.dtype.is_floating_point:
                    self.dst.append(bt)
                    self.src.append(bo)
                else:
                    self.copies.append((bt, bo))

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        if self.dst:
            torch._foreach_lerp_(self.dst, self.src, 1.0 - momentum)
        for dst, src in self.copies:
            dst.copy_(src)
