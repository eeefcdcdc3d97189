"""Schedules and EMA shared by every objective (the trainer applies them; objectives only
declare what they need).

All schedules are pure functions of the optimizer step, so resuming needs nothing but the step:
the learning-rate schedule cannot restart by accident (lightly-train #301).
"""

from __future__ import annotations

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
    """timm's warmup + cosine, stepped per optimizer update (``step_update(step)``)."""
    return CosineLRScheduler(optimizer, t_initial=max(1, total_steps), lr_min=min_lr,
                             warmup_t=warmup_steps, warmup_lr_init=warmup_lr,
                             warmup_prefix=False, t_in_epochs=False)


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


@torch.no_grad()
def ema_update(online: torch.nn.Module, target: torch.nn.Module, momentum: float) -> None:
    """target ← m·target + (1−m)·online, for parameters and floating buffers (BN statistics).
    One multi-tensor ``_foreach_lerp_`` over all of them (as timm's ``ModelEmaV3``), not a Python
    loop of one lerp (one kernel launch and its Python dispatch) per tensor."""
    dst, src = [], []
    for po, pt in zip(online.parameters(), target.parameters()):
        dst.append(pt)
        src.append(po.detach())
    for bo, bt in zip(online.buffers(), target.buffers()):
        if bt.dtype.is_floating_point:
            dst.append(bt)
            src.append(bo)
        else:
            bt.copy_(bo)
    if dst:
        torch._foreach_lerp_(dst, src, 1.0 - momentum)
