"""Value checks for a whole recipe, run by :func:`selfsup.config.load_recipe` before anything is built.

The schema only checks types: ``train.batch_size=0`` or ``optim.lr=-1`` are valid integers and
floats, and they used to surface as a torch traceback minutes later (or, for
``train.max_steps=0``, as a silent 200-epoch run). Every value is checked here at start, and the
first bad one is reported as one line that names its key. The objective's own keys are checked by
the objective when it is built (still before the first step); the generic rules below cover the
sizes every objective shares (head dimensions, depths, queue sizes).
"""

from __future__ import annotations

import math

LR_SCALING = ("linear", "sqrt", "none")
PRECISIONS = ("auto", "bf16", "fp32")
DECODE_MODES = ("cpu", "device")  # selfsup.data.DECODE_MODES (not imported: data pulls in torch)
# objective keys (any objective) that are sizes/counts: >= 1. Other objective values (loss,
# temperatures, ...) are checked by the objective itself when it is built, with its own message
POSITIVE_OBJECTIVE_INTS = ("proj_hidden_dim", "proj_dim", "proj_layers", "pred_depth", "pred_dim",
                           "queue_size", "num_targets", "num_context")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _range_pair(key: str, value, low: float, high: float | None, strict_low: bool) -> str | None:
    if value is None or len(value) != 2 or not all(_number(v) for v in value):
        return f"{key} must be two numbers [low, high], not {value}"
    lo, hi = value
    ok_low = lo > low if strict_low else lo >= low
    if not ok_low or lo > hi or (high is not None and hi > high):
        bound = f"{'<' if strict_low else '<='} low <= high" + (f" <= {high}" if high is not None else "")
        return f"{key} must be [low, high] with {low} {bound}, not {list(value)}"
    return None


def problems(cfg) -> list[str]:
    """Every bad value of ``cfg``, as ``key must ..., not VALUE`` (empty when all are fine)."""
    out: list[str] = []

    def need(ok: bool, key: str, what: str, value) -> None:
        if not ok:
            out.append(f"{key} must be {what}, not {value!r}")

    def at_least(key: str, value, low, optional: bool = False) -> None:
        if optional and value is None:
            return
        need(_number(value) and value >= low, key, f">= {low}" + (" (or null)" if optional else ""), value)

    def positive(key: str, value, optional: bool = False) -> None:
        if optional and value is None:
            return
        need(_number(value) and value > 0, key, "> 0" + (" (or null)" if optional else ""), value)

    def probability(key: str, value) -> None:
        need(_number(value) and 0 <= value <= 1, key, "in [0, 1]", value)

    r, d, a, m, o, t, c, mo = (cfg.run, cfg.data, cfg.augment, cfg.model, cfg.optim, cfg.train,
                               cfg.checkpoint, cfg.monitor)
    need(bool(r.dir and str(r.dir).strip()), "run.dir", "a directory", r.dir)
    at_least("run.seed", r.seed, 0)
    need(d.decode in DECODE_MODES, "data.decode", " or ".join(DECODE_MODES), d.decode)
    at_least("data.num_workers", d.num_workers, 0)
    at_least("data.shuffle_buffer", d.shuffle_buffer, 1)
    at_least("data.samples_per_epoch", d.samples_per_epoch, 1, optional=True)
    probability("data.max_corrupt_fraction", d.max_corrupt_fraction)
    at_least("augment.size", a.size, 2)
    out += filter(None, [_range_pair("augment.scale", a.scale, 0, 1, strict_low=True),
                         _range_pair("augment.ratio", a.ratio, 0, None, strict_low=True),
                         _range_pair("augment.blur_sigma", a.blur_sigma, 0, None, strict_low=True)])
    for key in ("hflip_p", "jitter_p", "gray_p", "blur_p", "solarize_p", "blur_kernel_frac"):
        probability(f"augment.{key}", getattr(a, key))
    for key in ("brightness", "contrast", "saturation"):
        at_least(f"augment.{key}", getattr(a, key), 0)
    need(_number(a.hue) and 0 <= a.hue <= 0.5, "augment.hue", "in [0, 0.5]", a.hue)
    need(len(a.mean) == len(a.std) and len(a.mean) in (1, 3) and all(_number(v) for v in a.mean),
         "augment.mean", "1 or 3 numbers, as many as augment.std", list(a.mean))
    need(all(_number(v) and v > 0 for v in a.std), "augment.std", "numbers > 0", list(a.std))
    need(bool(m.name and str(m.name).strip()), "model.name", "a timm model name", m.name)
    try:
        from timm.optim import list_optimizers

        optimizers = set(list_optimizers())
    except ImportError:  # older timm: let create_optimizer_v2 judge
        optimizers = {o.name}
    need(str(o.name).lower() in optimizers, "optim.name",
         "a timm optimizer (sgd, momentum, adamw, lars, lamb, ...)", o.name)
    positive("optim.lr", o.lr)
    need(o.lr_scaling in LR_SCALING, "optim.lr_scaling", " | ".join(LR_SCALING), o.lr_scaling)
    at_least("optim.weight_decay", o.weight_decay, 0)
    at_least("optim.weight_decay_end", o.weight_decay_end, 0, optional=True)
    need(_number(o.momentum) and 0 <= o.momentum < 1, "optim.momentum", "in [0, 1)", o.momentum)
    need(o.nesterov is None or isinstance(o.nesterov, bool), "optim.nesterov", "true, false or null", o.nesterov)
    at_least("optim.warmup_epochs", o.warmup_epochs, 0)
    at_least("optim.warmup_lr", o.warmup_lr, 0)
    at_least("optim.min_lr", o.min_lr, 0)
    positive("optim.clip_grad", o.clip_grad, optional=True)
    positive("train.epochs", t.epochs)
    at_least("train.max_steps", t.max_steps, 1, optional=True)
    at_least("train.batch_size", t.batch_size, 1)
    at_least("train.grad_accum", t.grad_accum, 1)
    need(t.precision in PRECISIONS, "train.precision", " | ".join(PRECISIONS), t.precision)
    at_least("train.log_every", t.log_every, 1)
    at_least("checkpoint.every_steps", c.every_steps, 0)
    at_least("checkpoint.keep", c.keep, 0)
    at_least("monitor.every_steps", mo.every_steps, 0)
    at_least("monitor.max_samples", mo.max_samples, 1)
    at_least("monitor.k", mo.k, 1)
    positive("monitor.temperature", mo.temperature)
    resume = str(cfg.resume).strip()
    need(bool(resume), "resume", "auto, none or a checkpoint directory", cfg.resume)
    objective = cfg.objective
    for key in POSITIVE_OBJECTIVE_INTS:
        if key in objective:
            at_least(f"objective.{key}", objective[key], 1)
    return out


def warmup_notes(optim, global_batch: int) -> list[str]:
    """Warnings (not errors) about the lr schedule at this global batch: ``warmup_lr`` and
    ``min_lr`` are absolute while ``lr`` follows the batch, so a recipe written for a large batch
    (ijepa_vit_base.yaml: 2e-4 → 1e-3 at 2048) can start its warm-up above the peak on fewer
    processes, and the "warm-up" then runs downwards."""
    from selfsup.schedules import scaled_lr

    peak = scaled_lr(optim.lr, global_batch, optim.lr_scaling)
    if optim.warmup_epochs > 0 and optim.warmup_lr > peak:
        return [f"optim.warmup_lr={optim.warmup_lr:g} is above the peak lr {peak:.3g} at global batch "
                f"{global_batch} (optim.lr={optim.lr:g} scaled {optim.lr_scaling}): the warm-up would "
                f"run downwards; set optim.warmup_lr to a fraction of the peak (e.g. {peak / 5:.3g})"]
    return []


def check_values(cfg) -> None:
    """Raise :class:`selfsup.config.RecipeError` naming the first bad value (and how many more)."""
    from selfsup.errors import RecipeError

    found = problems(cfg)
    if found:
        more = f" (and {len(found) - 1} more bad value(s))" if len(found) > 1 else ""
        raise RecipeError(f"bad recipe value: {found[0]}{more}")
