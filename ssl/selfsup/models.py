"""Backbones from timm, plus the one surgery small images need.

ImageNet ResNets downsample 4x before their first block (7x7 stride-2 conv + max-pool), which
throws away most of a 28-64 px image; the CIFAR convention replaces that stem with a 3x3 stride-1
conv and no max-pool (``model.small_stem=true``). The replacement is recorded in the exported
metadata so that any loader can repeat it (docs/formats.md).
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from selfsup.errors import ModelError  # noqa: F401  (also imported from here)


def apply_small_stem(model: nn.Module) -> nn.Module:
    """Replace a timm ResNet-style stem (conv1 [+bn1] + maxpool) by a 3x3 stride-1 conv."""
    if not (hasattr(model, "conv1") and hasattr(model, "maxpool") and hasattr(model, "bn1")):
        raise ModelError(f"model.small_stem applies to ResNet-style timm models (conv1, bn1, "
                         f"maxpool); {type(model).__name__} has none: set model.small_stem=false")
    first = model.conv1 if isinstance(model.conv1, nn.Conv2d) else model.conv1[0]
    model.conv1 = nn.Conv2d(first.in_channels, model.bn1.num_features, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def keep_last_norms(model: nn.Module) -> int:
    """Undo timm's ``zero_init_last`` on a freshly initialised model: the norm weights its residual
    blocks set to zero (a fresh norm's weight is one) become one again, as torchvision's default
    ``zero_init_residual=False`` leaves them (the ResNets of MoCo v2's and JigClu's official code).
    Done after creation, so it applies to every timm family with the switch (ResNet, ResNeSt,
    RegNet, CSPNet, ...) and to none without it, whose constructors would refuse the kwarg.
    Returns how many norms were reset."""
    reset = 0
    for block in model.modules():
        if not callable(getattr(block, "zero_init_last", None)):
            continue
        for m in block.modules():
            w = getattr(m, "weight", None)
            if (isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
                    and w is not None and not w.any()):
                with torch.no_grad():
                    w.fill_(1.0)
                reset += 1
    return reset


def create_backbone(name: str, kwargs: dict | None = None, small_stem: bool = False,
                    zero_init_last: bool | None = None) -> nn.Module:
    """A timm model without classifier (``num_classes=0``): ``model(x)`` gives pooled features.
    ``zero_init_last=False``: residual blocks start with their last norm's weight at one, not
    zero (:func:`keep_last_norms`); None or True: timm's default."""
    kwargs = {**(kwargs or {}), "num_classes": 0}
    if not timm.is_model(name):
        raise ModelError(f"model.name: unknown timm model {name!r} (see timm.list_models())")
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise ModelError(f"model.kwargs not accepted by timm model {name!r}: {e}") from None
    if small_stem:
        apply_small_stem(model)
    if zero_init_last is False:
        keep_last_norms(model)
    return model
