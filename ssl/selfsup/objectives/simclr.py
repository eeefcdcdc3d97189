"""SimCLR with InfoNCE (NT-Xent), DCL or DCLW loss.

The losses are lightly's (``NTXentLoss``, ``DCLLoss``, ``DCLWLoss``), with negatives gathered from
every process through an autograd-aware all-gather, so that 8 GPUs × 64 images see the negatives of
one 512-image batch and receive the gradient of the global loss (the DDP-averaged gradient equals
the single-process gradient of the same global batch; tested in ``tests/test_distributed.py``).

Conventions (see docs/methods.md §1): embeddings are L2-normalised inside the loss; the two
directions are averaged (lightly), not summed (raminnakhli's reference and Google's SimCLR, which
double the gradient: the same as twice the lr under plain SGD, little change under Adam or LARS);
DCLW's weights are detached and use the *local* batch size N when gathering. The loss runs with
autocast off (:func:`selfsup.objectives.base.full_precision`).

MoCHi (``objective.mochi``) and the Hallucinator (``objective.hallucinator``) need per-anchor extra
negatives and same-instance masks, which lightly's losses cannot take; when either is on, the same
loss is computed by :func:`selfsup.losses.contrastive_logits_loss` over
:func:`selfsup.losses.pair_similarities` (equal to lightly's without extras, tested). MoCHi's pool
is then the in-batch negatives of every process, 2·B_global − 2 per anchor, so ``mochi.n`` must not
exceed that (docs/methods.md §2.5.1). With both off the lightly path below runs unchanged.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from lightly.loss import DCLLoss, DCLWLoss, NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from lightly.utils import dist

from selfsup.augment import BatchAugment
from selfsup.errors import RecipeError
from selfsup.losses import LOSSES, contrastive_logits_loss, gather_cat, pair_similarities
from selfsup.objectives.base import Objective, full_precision, register
from selfsup.objectives.hallucinator import Hallucinator, HallucinatorConfig
from selfsup.objectives.mixing import (HardNegativeMixer, MochiConfig, check_mochi, monitor_has_labels,
                                       same_class_share)
from selfsup.schema import STRUCTURAL, at_least, key, one_of, positive

# lightly's DCLW builds its (detached) weights with torch.tensor(tensor), which warns once per
# process about copy-construction; the value is right, so the warning only alarms users
warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning,
                        module=r"lightly\.loss\.dcl_loss")


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
    in_batch_negatives = True  # negatives: the rest of the (gathered) micro-batch

    @dataclass
    class Config:
        name: str = key("simclr", "the objective (`simclr`, `moco`, `ijepa`, `jigclu`)", resume=STRUCTURAL)
        loss: str = key("dcl", "`infonce` (SimCLR's NT-Xent), `dcl` or `dclw` (decoupled; DCLW weights positives)",
                        check=one_of(*LOSSES))
        temperature: float = key(0.1, "τ", check=positive())
        sigma: float = key(0.5, "DCLW's weight temperature σ", check=positive())
        proj_hidden_dim: int = key(2048, "projection head width", check=at_least(1))
        proj_dim: int = key(128, "projection output dimension", check=at_least(1))
        proj_layers: int = key(2, "projection head layers", check=at_least(1))
        proj_batch_norm: bool = key(True, "BatchNorm in the projection head (SimCLR's)")
        mochi: MochiConfig = field(default_factory=MochiConfig)
        hallucinator: HallucinatorConfig = field(default_factory=HallucinatorConfig)

    def __init__(self, cfg, backbone):
        super().__init__(cfg, backbone)
        oc = cfg.objective
        rows = 2 if oc.hallucinator.enabled else 1  # rows per image and view: z (and h)
        global_batch = cfg.train.batch_size * dist.world_size()
        check_mochi(oc.mochi, 2 * rows * (global_batch - 1), "in-batch negatives")  # own rows masked
        self.augment = BatchAugment.from_config(cfg.augment)
        self.head = SimCLRProjectionHead(backbone.num_features, oc.proj_hidden_dim, oc.proj_dim,
                                         oc.proj_layers, oc.proj_batch_norm)
        self.mixer = HardNegativeMixer(oc.mochi)
        self._label_hard = self.mixer.enabled and monitor_has_labels(cfg)  # for a metric only
        self.hallucinator = (Hallucinator.from_config(oc.hallucinator, oc.proj_dim)
                             if oc.hallucinator.enabled else None)

    def embed(self, views: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(views))

    def loss_from_views(self, v0: torch.Tensor, v1: torch.Tensor, generator=None,
                        epoch: float = math.inf, labels: torch.Tensor | None = None):
        """Loss of two augmented view batches: one backbone pass over both views. ``labels``
        (class ids, -1 unknown) only feed the ``mochi_hard_same_class`` metric."""
        oc = self.cfg.objective
        labels = labels if self._label_hard else None
        z = self.embed(torch.cat([v0, v1]))
        metrics = {}
        with full_precision(z):  # the loss in >= fp32 under the trainer's bf16 autocast
            z0, z1 = z.to(torch.promote_types(z.dtype, torch.float32)).chunk(2)
            if self.hallucinator is None and not self.mixer.active(epoch):
                loss = contrastive_loss(z0, z1, oc.loss, oc.temperature, oc.sigma, gather_distributed=True)
            else:
                loss = self.composed_loss(z0, z1, generator, epoch, metrics, labels)
        with torch.no_grad():
            n0, n1 = torch.nn.functional.normalize(z0, dim=1), torch.nn.functional.normalize(z1, dim=1)
            metrics.update(pos_sim=(n0 * n1).sum(1).mean(), z_std=n0.std(0).mean())
        return loss, metrics

    def composed_loss(self, z0, z1, generator, epoch, metrics, labels=None) -> torch.Tensor:
        """The same loss through the similarity-level path, with hallucinated positives (queries
        ``[z0; h]``, keys ``[z1; z1]``: the published NT-Xent over those rows, or with
        ``hallucinator.mask_same_image`` an image's other rows never its negatives) and/or mixed
        hard negatives as extra per-anchor logits."""
        oc = self.cfg.objective
        instance = None  # each row its own id: only the anchor itself and its positive masked
        if self.hallucinator is not None:
            h, metrics["halluc_lambda"] = self.hallucinator(z0, z1, generator)
            if oc.hallucinator.mask_same_image:
                instance = torch.arange(len(z0), device=z0.device).repeat(2)
            z0, z1 = torch.cat([z0, h]), torch.cat([z1, z1])
        anchors, pos, neg, pool = pair_similarities(z0, z1, instance, gather_distributed=True)
        extra = None
        if self.mixer.active(epoch):
            extra, mixed = self.mixer.extra_similarities(anchors, pool, neg, generator)
            metrics["mochi_hard_sim"] = neg.detach().gather(1, mixed.hard).mean()
            if labels is not None:  # rows [z0; h] share their image's label; the pool is [z0; z1]
                rows = labels.to(z0.device, torch.long).repeat(len(z0) // len(labels))
                pool_rows = gather_cat(rows, grad=False)  # every process's, as the pool
                metrics["mochi_hard_same_class"] = same_class_share(
                    mixed.hard, rows.repeat(2), pool_rows.repeat(2))
        return contrastive_logits_loss(pos, neg, extra, oc.loss, oc.temperature, oc.sigma)

    def forward(self, batch, generator):
        epoch = batch.get("epoch", math.inf)  # the trainer sets it; callers without it get mixing
        labels = batch.get("label")  # class labels of labelled shards (-1: none), for a metric only
        if "views" in batch:  # views made elsewhere (a CPU transform pipeline, a test)
            return self.loss_from_views(*batch["views"], generator=generator, epoch=epoch, labels=labels)
        views = batch["image"]  # (B, 2, 3, S, S): two crops per image, cut by the loader
        return self.loss_from_views(self.augment(views[:, 0], generator), self.augment(views[:, 1], generator),
                                    generator=generator, epoch=epoch, labels=labels)
