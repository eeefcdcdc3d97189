"""Value checks for a whole recipe, run by :func:`selfsup.config.load_recipe` before anything is built.

The schema only checks types: ``train.batch_size=0`` or ``optim.lr=-1`` are valid integers and
floats, and they would surface as a torch traceback minutes later (or, for ``train.max_steps=0``,
as a silent 200-epoch run). Each key's own rule is declared with the key
(:func:`selfsup.schema.key`, in :mod:`selfsup.config` and in each objective's ``Config``) and
applied here to every key; the rules below relate two keys or ask a library. The first bad value
is reported as one line that names its key.
"""

from __future__ import annotations

import math

from omegaconf import OmegaConf



def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def problems(cfg, schema) -> list[str]:
    """Every bad value of ``cfg``, as ``key must ..., not VALUE`` (empty when all are fine);
    ``schema`` is :func:`selfsup.config.schema_fields` of the recipe's objective."""
    out: list[str] = []
    for name, f in schema:
        check = f.metadata.get("check")
        if check is None:
            continue
        value = OmegaConf.select(cfg, name)
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value)
        what = check(value)
        if what:
            out.append(f"{name} must be {what}, not {value!r}")
    out += _cross_key_problems(cfg)
    return out


def _cross_key_problems(cfg) -> list[str]:
    out: list[str] = []
    a, o = cfg.augment, cfg.optim
    if not (len(a.mean) == len(a.std) and len(a.mean) in (1, 3) and all(_number(v) for v in a.mean)):
        out.append(f"augment.mean must be 1 or 3 numbers, as many as augment.std, not {list(a.mean)!r}")
    if not all(_number(v) and v > 0 for v in a.std):
        out.append(f"augment.std must be numbers > 0, not {list(a.std)!r}")
    try:
        from timm.optim import list_optimizers

        optimizers = set(list_optimizers())
    except ImportError:  # older timm: let create_optimizer_v2 judge
        optimizers = {o.name}
    if str(o.name).lower() not in optimizers:
        out.append(f"optim.name must be a timm optimizer (sgd, momentum, adamw, lars, lamb, ...), not {o.name!r}")
    mo = cfg.monitor
    for name, on in (("checkpoint.keep_best", cfg.checkpoint.keep_best), ("monitor.min_vs_init", mo.min_vs_init is not None)):
        if on and not mo.every_steps > 0:
            out.append(f"monitor.every_steps must be > 0 for {name} (the guard reads the online monitor), "
                       f"not {mo.every_steps!r}")
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


def schedule_problems(optim, global_batch: int) -> list[str]:
    """Errors of the lr schedule once the global batch is known: ``min_lr`` is absolute while
    the peak follows the batch, and a ``min_lr`` above the peak turns the cosine decay into a
    climb (an lr of 7.5 by the end of a run was seen)."""
    from selfsup.schedules import scaled_lr

    peak = scaled_lr(optim.lr, global_batch, optim.lr_scaling)
    if optim.min_lr > peak:
        return [f"optim.min_lr must be <= the peak lr {peak:.4g} (optim.lr={optim.lr:g} scaled "
                f"{optim.lr_scaling} at global batch {global_batch}), not {optim.min_lr:g}"]
    return []


def check_values(cfg, schema) -> None:
    """Raise :class:`selfsup.config.RecipeError` naming the first bad value (and how many more)."""
    from selfsup.errors import RecipeError

    found = problems(cfg, schema)
    if found:
        more = f" (and {len(found) - 1} more bad value(s))" if len(found) > 1 else ""
        raise RecipeError(f"bad recipe value: {found[0]}{more}")
