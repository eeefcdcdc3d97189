"""Shuffle-BN (MoCo, He et al. 2020, §3.3) and split-BN, its emulation on one process
(docs/methods.md §2.2).

Why: with BatchNorm in the encoders, a query and its positive key normalised over the *same*
batch share that batch's statistics, and every negative in the queue comes from an older batch.
The model can then find its positive through the statistics ("cheat") instead of the image. MoCo
shuffles the key batch across GPUs before the key encoder, so each key is normalised with a
random group of other keys, not the group its query was normalised with, and unshuffles the keys
after. Each GPU's BatchNorm sees only its own images (MoCo uses no SyncBatchNorm).

* **Split-BN** (:func:`split_batchnorm`, ``objective.bn_splits = S``): every BatchNorm of the
  query and key encoders computes its training-mode statistics over S consecutive groups of the
  process's batch, as S processes with B/S images each would. MoCo's own CIFAR demo and lightly
  use this to run MoCo on one GPU.
* **Shuffle** (:func:`shuffled_keys`, ``objective.shuffle_bn``): the key batch is gathered from
  every process, permuted by a permutation drawn on rank 0 (from the trainer's checkpointed
  generator) and broadcast, each process encodes its slice of the permuted batch (in S groups),
  and the keys are gathered and put back in the original order, as MoCo's
  ``_batch_shuffle_ddp``/``_batch_unshuffle_ddp``. On one process the shuffle is within the batch.

S processes with shuffle and one process with ``bn_splits = S`` form the same groups from the
same permutation, so they compute the same loss on the same global batch (tested).

Why not lightly's ``SplitBatchNorm`` (``lightly.models.batchnorm``): its running statistics are
buffers of S × C values, so the backbone's state dict no longer loads into the plain timm model
that selfsup-eval and the Hugging Face export build; it groups samples s, s+S, s+2S, … rather
than consecutive ones, so it cannot reproduce S processes' query groups; its ``view`` fails on
channels_last inputs (the recipes' default); and swapping modules for it would drop the
activation of timm's ``BatchNormAct2d``. Here each BatchNorm keeps its class's own forward,
parameters and buffers and is called once per group. Its running statistics are updated once
per group (an EMA over groups), used only in eval mode (the monitor, the export).
"""

from __future__ import annotations

from typing import Callable

import torch
from lightly.utils import dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from selfsup.losses import gather_cat


class _SplitBatchNorm:
    """Mixed in before a BatchNorm class: training-mode statistics per group of rows."""

    bn_splits: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = super().forward  # the BatchNorm class's own forward (timm's act included)
        if self.bn_splits == 1 or (not self.training and self.running_mean is not None):
            return plain(x)  # eval mode: running statistics, no groups
        if x.shape[0] % self.bn_splits:
            raise ValueError(f"a batch of {x.shape[0]} does not split into objective.bn_splits="
                             f"{self.bn_splits} equal groups")
        return torch.cat([plain(group) for group in x.chunk(self.bn_splits)])


_CLASSES: dict[type, type] = {}


def _split_class(cls: type) -> type:
    if cls not in _CLASSES:
        name = f"Split{cls.__name__}"
        new = type(name, (_SplitBatchNorm, cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = new  # importable by name, like a class written here
        _CLASSES[cls] = new
    return _CLASSES[cls]


def split_batchnorm(module: nn.Module, splits: int) -> nn.Module:
    """Every BatchNorm in ``module`` computes its training statistics over ``splits`` groups of
    consecutive rows, in place; state-dict keys and shapes are unchanged. ``splits = 1``: no-op."""
    if splits < 1:
        raise ValueError(f"objective.bn_splits must be >= 1, not {splits}")
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            if not isinstance(m, _SplitBatchNorm):
                if splits == 1:
                    continue
                m.__class__ = _split_class(type(m))
            m.bn_splits = splits
    return module


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in module.modules())


@torch.no_grad()
def shuffled_keys(encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                  generator: torch.Generator | None) -> torch.Tensor:
    """``encode`` of this process's rows of ``x``, with the global batch shuffled across processes
    before ``encode`` and the result put back in ``x``'s order: MoCo's shuffle-BN. The
    permutation is drawn from ``generator`` (rank 0's is broadcast)."""
    world, b = dist.world_size(), x.shape[0]
    if world == 1:
        perm = torch.randperm(b, generator=generator).to(x.device)
        k = encode(x[perm])
        return torch.empty_like(k).index_copy_(0, perm, k)
    xs = gather_cat(x, grad=False)  # every process's rows, rank order
    perm = torch.randperm(xs.shape[0], generator=generator).to(x.device)
    torch.distributed.broadcast(perm, src=0)
    rank = dist.rank()
    k = gather_cat(encode(xs[perm[rank * b:(rank + 1) * b]]), grad=False)  # k[j]: row perm[j]
    return torch.empty_like(k).index_copy_(0, perm, k)[rank * b:(rank + 1) * b]
