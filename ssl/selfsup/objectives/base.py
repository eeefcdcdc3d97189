"""The objective interface and its registry.

An objective is an ``nn.Module`` that owns everything a method adds on top of the backbone (heads,
predictors, queues, momentum encoders, its augmentation) and turns a batch into a loss. The trainer
supplies what every method shares: the backbone, the optimizer and schedules, EMA updates of the
pairs an objective declares, checkpoints, logging and export. This mirrors solo-learn's base
method with thin subclasses, without the subclasses owning the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass, is_dataclass
from typing import Callable

import torch
from omegaconf import OmegaConf
from torch import distributed as dist
from torch import nn

from selfsup.errors import RecipeError, warn
from selfsup.views import ViewSpec

_REGISTRY: dict[str, type["Objective"]] = {}


@dataclass
class ObjectiveConfig:
    name: str = "simclr"


class Objective(nn.Module):
    """Base class. Subclasses set ``Config`` (a dataclass with a ``name`` field) and implement
    :meth:`forward`.

    ``views()`` says which crops the loader cuts from every image (:class:`selfsup.views.ViewSpec`;
    by default two ``RandomResizedCrop(augment.size, augment.scale, augment.ratio)`` views, as the
    two-view contrastive methods use). ``forward(batch, generator)`` receives the batch on the
    training device (``batch["image"]`` is those views, uint8 (B, V, 3, S, S)) and the trainer's
    augmentation RNG (a CPU ``torch.Generator`` that is
    checkpointed, so resumed runs draw the same augmentations). ``batch["epoch"]`` (float) is the
    number of epochs completed before this batch, for warm-ups (MoCHi). It returns ``(loss, metrics)``
    where ``metrics`` maps names to scalar tensors or floats, logged as they are.
    """

    Config: type = ObjectiveConfig
    name: str = "base"
    export_pool: str = "head"  # how selfsup-eval pools the exported backbone (docs/formats.md)
    # the backbone method the objective calls, which the default ``compile_step`` compiles; None
    # when the objective runs the backbone's pieces itself (I-JEPA's masked encoder), where
    # compiling the backbone would change nothing: such an objective overrides ``compile_step``
    backbone_entry: str | None = "forward"
    # the loss contrasts each sample with the rest of its micro-batch (SimCLR, JigClu): gradient
    # accumulation scales the lr for the accumulated batch but gives the loss no more negatives,
    # which users reaching for a large contrastive batch are told at start (one warning line)
    in_batch_negatives: bool = False

    def __init__(self, cfg, backbone: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self._host_counts: dict[str, int] = {}
        accum = OmegaConf.select(cfg, "train.grad_accum", default=1) if OmegaConf.is_config(cfg) else 1
        if self.in_batch_negatives and accum > 1 and (not dist.is_initialized() or dist.get_rank() == 0):
            warn(f"train.grad_accum={accum}: each micro-batch's {self.name} loss contrasts only its own "
                 "samples (accumulation enlarges the batch each step averages over, but does not "
                 "enlarge the set of negatives)")

    def register_counter(self, name: str) -> None:
        """A call counter that checkpoints carry (a 0-d long buffer ``name``, so that a resumed
        run redraws the same random choices) and that the host reads without waiting for the
        device: ``int(buffer)`` every step would stall a GPU's queue of kernels once per step.
        The host copy is refreshed whenever a state dict is loaded."""
        self.register_buffer(name, torch.zeros((), dtype=torch.long))
        self._host_counts[name] = 0

    def next_count(self, name: str) -> int:
        """The counter's value before this call, then one more (the buffer is advanced on its
        device, asynchronously)."""
        value = self._host_counts[name]
        self._host_counts[name] = value + 1
        getattr(self, name).add_(1)
        return value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      *args, **kwargs)
        for name in self._host_counts:  # one sync per load, none per step
            if prefix + name in missing_keys:  # a checkpoint from before the counter existed
                missing_keys.remove(prefix + name)  # (MoCo's enqueue_calls): it stays 0
            self._host_counts[name] = int(getattr(self, name))

    def views(self) -> list[ViewSpec]:
        aug = self.cfg.augment
        return [ViewSpec(aug.size, tuple(aug.scale), tuple(aug.ratio))] * 2

    def forward(self, batch: dict, generator: torch.Generator):
        raise NotImplementedError

    def online_backbone(self) -> nn.Module:
        """The backbone the optimizer trains, where ``model.init`` loads its weights (the
        trainer then copies them into every :meth:`momentum_pairs` target). Usually
        :attr:`backbone`; an objective that exports an EMA copy says which one trains."""
        return self.backbone

    def backbones(self) -> list[nn.Module]:
        """Every copy of the backbone the step runs through ``backbone_entry``: ``model.compile``
        compiles each (MoCo's key encoder is a copy made before compiling, so it is listed)."""
        return [self.backbone]

    def compile_step(self) -> None:
        """``model.compile``: ``torch.compile`` what the step runs. By default the
        ``backbone_entry`` method of every copy in :meth:`backbones` (the heads and losses are
        small next to the backbone); compilation itself happens lazily, at the first step."""
        if self.backbone_entry is None:
            raise NotImplementedError(f"objective {self.name!r} must override compile_step")
        for net in self.backbones():
            if self.backbone_entry == "forward":
                net.compile()
            else:
                setattr(net, self.backbone_entry, torch.compile(getattr(net, self.backbone_entry)))

    def sync_batchnorm(self) -> nn.Module:
        """Several GPUs: the module to train with BatchNorm synchronised across processes (the
        trainer calls this instead of converting itself). An objective whose method keeps
        per-process statistics on purpose (MoCo's shuffle-BN) returns itself."""
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(self)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """``(online, target)`` module pairs the trainer updates by EMA after each optimizer
        step (momentum encoders, I-JEPA's target encoder). Empty for most methods."""
        return []

    def momentum(self, progress: float) -> float | None:
        """EMA momentum at ``progress`` in [0, 1] of training; None when there is no EMA."""
        return None


def full_precision(t: torch.Tensor):
    """A region that autocast leaves alone, for a loss: the trainer runs the whole objective under
    bf16 autocast on GPUs, and casting inputs to fp32 does not keep autocast from running the
    matmuls inside in bf16 (cosines near 1 at τ = 0.1–0.2 carry ~1 % error there). Inputs must be
    cast to fp32 inside it."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def register(name: str) -> Callable[[type[Objective]], type[Objective]]:
    def deco(cls: type[Objective]) -> type[Objective]:
        if name in _REGISTRY:
            raise ValueError(f"objective {name!r} registered twice")
        if not is_dataclass(cls.Config):
            raise TypeError(f"{cls.__name__}.Config must be a dataclass")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def registered() -> list[str]:
    return sorted(_REGISTRY)


def _lookup(name: str) -> type[Objective]:
    if name not in _REGISTRY:
        raise RecipeError(f"unknown objective.name {name!r}; registered: {', '.join(registered())}")
    return _REGISTRY[name]


def objective_config(name: str) -> type:
    return _lookup(name).Config


def build_objective(cfg, backbone: nn.Module) -> Objective:
    return _lookup(cfg.objective.name)(cfg, backbone)
