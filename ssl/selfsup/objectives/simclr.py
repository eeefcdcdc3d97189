"""SimCLR with InfoNCE (NT-Xent), DCL or DCLW loss.

The losses are lightly's (``NTXentLoss``, ``DCLLoss``, ``DCLWLoss``), with negatives gathered from
every process through an autograd-aware all-gather, so that 8 GPUs × 64 images see the negatives of
one 512-image batch and receive the gradient of the global loss (the DDP-averaged gradient equals
the single-process gradient of the same global batch; tested in ``tests/test_distributed.py``).

Conventions (see ../shared/methods.md §1): embeddings are L2-normalised inside the loss; the two
directions are averaged (lightly), not summed (raminnakhli's reference, which doubles the
effective lr); DCLW's weights are detached and use the *local* batch size N when gathering.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from lightly.loss import DCLLoss, DCLWLoss, NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from omegaconf import OmegaConf

from selfsup.augment import BatchAugment
from selfsup.config import RecipeError
from selfsup.objectives.base import Objective, register

LOSSES = ("infonce", "dcl", "dclw")


@lru_cache(maxsize=None)
def _loss_module(loss: str, temperature: float, sigma: float, gather: bool) -> torch.nn.Module:
    if loss == "infonce":
        return NTXentLoss(temperature=temperature, gather_distributed=gather)
    if loss == "dcl":
        return DCLLoss(temperature=temperature, gather_distributed=gather)
    if loss == "dclw":
        return DCLWLoss(temperature=temperature, sigma=sigma, gather_distributed=gather)
    raise RecipeError(f"objective.loss must be one of {', '.join(LOSSES)}, not {loss!r}")


def contrastive_loss(z0: torch.Tensor, z1: torch.Tensor, loss: str = "dcl",
                     temperature: float = 0.1, sigma: float = 0.5,
                     gather_distributed: bool = False) -> torch.Tensor:
    """Contrastive loss of two (B, D) embedding batches whose rows ``i`` are positives.

    ``loss`` is ``infonce`` (NT-Xent), ``dcl`` (positive removed from the denominator) or
    ``dclw`` (DCL with von Mises-Fisher weights on the positive term, σ = ``sigma``). Mean over
    the 2B anchors. With ``gather_distributed`` the negatives of all processes are used.
    """
    return _loss_module(loss, float(temperature), float(sigma), bool(gather_distributed))(z0, z1)


@register("simclr")
class SimCLR(Objective):
    @dataclass
    class Config:
        name: str = "simclr"
        loss: str = "dcl"  # infonce | dcl | dclw
        temperature: float = 0.1
        sigma: float = 0.5  # DCLW weight temperature
        proj_hidden_dim: int = 2048
        proj_dim: int = 128
        proj_layers: int = 2
        proj_batch_norm: bool = True

    def __init__(self, cfg, backbone):
        super().__init__(cfg, backbone)
        oc = cfg.objective
        _loss_module(oc.loss, oc.temperature, oc.sigma, True)  # validate the name early
        self.augment = BatchAugment(**OmegaConf.to_container(cfg.augment))
        self.head = SimCLRProjectionHead(backbone.num_features, oc.proj_hidden_dim, oc.proj_dim,
                                         oc.proj_layers, oc.proj_batch_norm)

    def embed(self, views: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(views))

    def loss_from_views(self, v0: torch.Tensor, v1: torch.Tensor):
        """Loss of two augmented view batches: one backbone pass over both views."""
        oc = self.cfg.objective
        z = self.embed(torch.cat([v0, v1]))
        z0, z1 = z.to(torch.promote_types(z.dtype, torch.float32)).chunk(2)  # loss in >= fp32
        loss = contrastive_loss(z0, z1, oc.loss, oc.temperature, oc.sigma, gather_distributed=True)
        with torch.no_grad():
            n0, n1 = torch.nn.functional.normalize(z0, dim=1), torch.nn.functional.normalize(z1, dim=1)
            metrics = {"pos_sim": (n0 * n1).sum(1).mean(), "z_std": n0.std(0).mean()}
        return loss, metrics

    def forward(self, batch, generator):
        if "views" in batch:  # views made elsewhere (a CPU transform pipeline, a test)
            return self.loss_from_views(*batch["views"])
        images = batch["image"]
        return self.loss_from_views(self.augment(images, generator), self.augment(images, generator))
