"""The recipe's optimizer, with the fastest update implementation its class offers on the device.

timm's ``create_optimizer_v2`` builds the optimizer (parameter groups without weight decay for
biases and norms, LARS, ...). What it leaves to the caller is the implementation of the update:
a per-parameter Python loop launches a handful of small kernels per tensor, which for a ViT-B
(~150 tensors) is several hundred launches, each with its Python dispatch, per step. PyTorch's SGD/Adam/AdamW have a
``fused`` CUDA kernel (one launch per group of tensors); the others (timm's LARS, LAMB) a
``foreach`` multi-tensor path. On the CPU the ``foreach`` path is kept too: it produces the same
update, with less Python per tensor (bench/host_overhead.py measures the host time per step).
The trainer and ``bench/gpu.py`` both build their optimizer here, so a benchmark measures what a
run trains with.

Two of timm's choices are not every method's: its ``sgd`` is Nesterov SGD (``momentum`` is the
classical one), and it exempts biases and norm parameters (every 1-D tensor) from weight decay.
SimCLR's LARS and I-JEPA's AdamW exempt them too; MoCo v2's and JigClu's official
``torch.optim.SGD(model.parameters(), ...)`` decays everything with classical momentum. The recipe
keys ``optim.nesterov`` (None: the optimizer's own default; ignored by optimizers whose class has
no such argument, so ``optim.name=adamw`` over moco.yaml works) and ``optim.decay_bias_and_norm``
(any optimizer; it carries over an ``optim.name`` override) say which. The latter keeps timm's
two parameter groups and gives the second the same decay, so a checkpoint's optimizer state has
the same layout either way, and a resume re-applies the recipe's settings to the loaded groups.
"""

from __future__ import annotations

import inspect

import torch
from timm.optim import create_optimizer_v2, get_optimizer_class

MOMENTUM_OPTIMIZERS = ("sgd", "momentum", "lars", "nesterov")
# param-group entries a resume leaves as loaded: lr follows the scheduler, params the model, and
# the update's implementation flags decided how torch placed the loaded state (a fused Adam's
# step counts on the device, a foreach one's on the host): switching them under it breaks the step
NOT_HYPERPARAMETERS = ("params", "param_names", "lr", "initial_lr", "fused", "foreach", "capturable",
                       "differentiable")


def update_kwargs(name: str, device: torch.device) -> dict:
    """``{"fused": True}`` where the optimizer class has a fused kernel for ``device`` (CUDA),
    else ``{"foreach": True}`` where it has a multi-tensor path, else nothing."""
    if torch.device(device).type == "cuda" and _takes(name, "fused"):
        return {"fused": True}
    if _takes(name, "foreach"):
        return {"foreach": True}
    return {}


def layer_decay_groups(model: torch.nn.Module, backbone: torch.nn.Module, weight_decay: float,
                       layer_decay: float) -> list[dict]:
    """Layer-wise learning-rate decay (BEiT; timm's ``param_groups_layer_decay``) for continued
    pretraining: the backbone's layers, by its timm ``group_matcher`` (ViT: embeddings, each
    block, the final norm with the last block; ResNet: the stem, each residual block), get ``lr_scale =
    layer_decay ** (last layer - layer)``, so the early layers that pretrained weights got most
    right move least. Everything outside the backbone (projection heads, predictors) is new and
    trains at the full rate (``lr_scale`` 1). 1-D tensors and the backbone's ``no_weight_decay()``
    names get no weight decay, as timm's groups without layer decay. timm's scheduler multiplies
    each group's lr by its ``lr_scale``."""
    from timm.optim import param_groups_layer_decay

    skip = getattr(backbone, "no_weight_decay", lambda: ())()
    groups = param_groups_layer_decay(backbone, weight_decay=weight_decay, no_weight_decay_list=skip,
                                      layer_decay=layer_decay)
    inside = {id(p) for p in backbone.parameters()}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in inside]
    for decay, params in ((weight_decay, [p for p in rest if p.ndim > 1]), (0.0, [p for p in rest if p.ndim <= 1])):
        if params:
            groups.append({"lr_scale": 1.0, "weight_decay": decay, "params": params})
    return groups


def create_optimizer(model: torch.nn.Module, optim_cfg, lr: float, device,
                     backbone: torch.nn.Module | None = None) -> torch.optim.Optimizer:
    """The recipe's ``optim`` section for ``model``'s parameters on ``device`` (timm's names);
    with ``optim.layer_decay``, the groups of :func:`layer_decay_groups` over ``backbone`` (the
    encoder that trains)."""
    kwargs = {"momentum": optim_cfg.momentum} if optim_cfg.name in MOMENTUM_OPTIMIZERS else {}
    if getattr(optim_cfg, "nesterov", None) is not None and _takes(optim_cfg.name, "nesterov"):
        kwargs["nesterov"] = bool(optim_cfg.nesterov)
    kwargs.update(update_kwargs(optim_cfg.name, device))
    params = model
    if getattr(optim_cfg, "layer_decay", None) is not None:
        params = layer_decay_groups(model, backbone, optim_cfg.weight_decay, optim_cfg.layer_decay)
    optimizer = create_optimizer_v2(params, opt=optim_cfg.name, lr=lr, weight_decay=optim_cfg.weight_decay,
                                    **kwargs)
    for group in optimizer.param_groups:
        if getattr(optim_cfg, "decay_bias_and_norm", False):
            group["weight_decay"] = optim_cfg.weight_decay
        group["initial_weight_decay"] = group["weight_decay"]  # the weight-decay schedule's base
    return optimizer


def _takes(name: str, argument: str) -> bool:
    return argument in inspect.signature(get_optimizer_class(name, bind_defaults=False).__init__).parameters


def recipe_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each param group's settings as the recipe built them (momentum, nesterov, betas, weight
    decay and its schedule's base, ...), for :func:`reapply_hyperparameters`."""
    return [{k: v for k, v in g.items() if k not in NOT_HYPERPARAMETERS} for g in optimizer.param_groups]


def reapply_hyperparameters(optimizer: torch.optim.Optimizer, groups: list[dict]) -> None:
    """After a resume: torch's ``load_state_dict`` brings back each group's settings as saved,
    so a run resumed with ``optim.momentum``/``nesterov``/``decay_bias_and_norm`` changed (on
    purpose, or by a recipe that gained the keys) silently kept the checkpoint's. The recipe's
    win; the state (momentum buffers, Adam moments, step counts) is the checkpoint's."""
    for group, want in zip(optimizer.param_groups, groups, strict=True):
        group.update(want)
