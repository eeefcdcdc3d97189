"""MoCo-v2 (He et al. 2020; Chen et al. 2020): a momentum key encoder and a queue of negatives,
with InfoNCE, DCL or DCLW over the queue; MoCHi and the Hallucinator plug in from the recipe.

* **Key encoder**: a copy of the backbone + projection head, updated only by EMA. It is declared
  through :meth:`momentum_pairs` / :meth:`momentum` so that the *trainer* applies the EMA after each
  optimizer step (momentum ``objective.momentum``, optionally cosine-scheduled to 1.0). Its
  parameters have ``requires_grad=False`` (lightly's ``deactivate_requires_grad``), so neither
  the optimizer nor DDP sees them, and it runs under ``no_grad``.
* **Queue**: K L2-normalised keys in a registered buffer (``queue``, with ``queue_ptr``), so
  accelerate saves it in checkpoints and restores it on resume. Every step enqueues the keys of
  **all** processes, gathered in rank order without gradient (lightly #1018 enqueued only the local
  keys, so each rank's queue drifted apart); the queue is a FIFO ring: ``queue[ptr]`` is the oldest
  key and the next to be overwritten. Every rank holds the same queue, so 2 processes and 1 process
  on the same global batch have identical queues (tested).
* **Loss**: for query q and its key k (other view), ``[q·k | q·queue]/τ`` through
  :func:`selfsup.losses.contrastive_logits_loss` (InfoNCE = MoCo's cross-entropy with label 0; DCL
  drops the positive from the denominator). Asymmetric, as MoCo-v2: view 0 gives the queries,
  view 1 the keys. Computed in fp32 with autocast off (τ = 0.2 over 65536 logits is too fine for
  bf16).
* **BatchNorm**: MoCo-v2 shuffles the key batch across GPUs so that BN statistics cannot leak
  which key matches which query. We do not shuffle: on one process the key encoder's BN sees the
  key batch (accepted for single-process runs); on multi-GPU runs the trainer converts BN to
  SyncBatchNorm, so key statistics come from the whole global batch, which carries little
  per-sample information at MoCo's batch sizes. The MoCo-v2 head (Linear–ReLU–Linear) has no BN.
* **MoCHi** (``objective.mochi``): extra per-query negatives mixed from that query's hardest
  queue entries (:mod:`selfsup.objectives.mixing`), never enqueued.
* **Hallucinator** (``objective.hallucinator``): queries ``[q; h]`` against keys ``[k; k]``; the
  keys are enqueued once (:mod:`selfsup.objectives.hallucinator` explains why).

The exported backbone is the query encoder (``objective.backbone``), as in MoCo's evaluation.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from lightly.models.modules import MoCoProjectionHead
from lightly.models.utils import deactivate_requires_grad
from lightly.utils import dist

from selfsup.augment import BatchAugment
from selfsup.errors import RecipeError
from selfsup.losses import check_loss, contrastive_logits_loss, gather_cat
from selfsup.objectives.base import Objective, register
from selfsup.objectives.hallucinator import Hallucinator, HallucinatorConfig, check_hallucinator
from selfsup.objectives.mixing import HardNegativeMixer, MochiConfig, check_mochi
from selfsup.schedules import cosine


@register("moco")
class MoCo(Objective):
    @dataclass
    class Config:
        name: str = "moco"
        loss: str = "infonce"  # infonce | dcl | dclw, over [key | queue]
        temperature: float = 0.2
        sigma: float = 0.5  # DCLW weight temperature
        queue_size: int = 65536  # K
        momentum: float = 0.999  # key-encoder EMA
        momentum_cosine: bool = False  # cosine schedule from `momentum` to 1.0 over training
        proj_hidden_dim: int = 2048
        proj_dim: int = 128
        proj_layers: int = 2
        proj_batch_norm: bool = False  # MoCo-v2: no BN in the head
        mochi: MochiConfig = field(default_factory=MochiConfig)
        hallucinator: HallucinatorConfig = field(default_factory=HallucinatorConfig)

    def __init__(self, cfg, backbone):
        super().__init__(cfg, backbone)
        oc = cfg.objective
        check_loss(oc.loss, oc.temperature, oc.sigma)
        if not 0.0 <= oc.momentum <= 1.0:
            raise RecipeError(f"objective.momentum must be in [0, 1], not {oc.momentum}")
        global_batch = cfg.train.batch_size * dist.world_size()
        if oc.hallucinator.enabled and oc.hallucinator.enqueue_twice:
            global_batch *= 2  # [k; k] enqueued
        if oc.queue_size < global_batch:
            raise RecipeError(f"objective.queue_size={oc.queue_size} is smaller than the "
                              f"{global_batch} keys enqueued every step")
        check_mochi(oc.mochi, oc.queue_size, "queue entries")
        check_hallucinator(oc.hallucinator)
        self.augment = BatchAugment.from_config(cfg.augment)
        self.head = MoCoProjectionHead(backbone.num_features, oc.proj_hidden_dim, oc.proj_dim,
                                       oc.proj_layers, oc.proj_batch_norm)
        self.backbone_key = copy.deepcopy(backbone)
        self.head_key = copy.deepcopy(self.head)
        deactivate_requires_grad(self.backbone_key)
        deactivate_requires_grad(self.head_key)
        # the same seed on every process (the trainer seeds before building) → the same queue
        self.register_buffer("queue", F.normalize(torch.randn(oc.queue_size, oc.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.mixer = HardNegativeMixer(oc.mochi)
        self.hallucinator = (Hallucinator.from_config(oc.hallucinator, oc.proj_dim)
                             if oc.hallucinator.enabled else None)

    # ---------------------------------------------------------------- what the trainer uses --
    def backbones(self):
        return [self.backbone, self.backbone_key]

    def momentum_pairs(self):
        return [(self.backbone, self.backbone_key), (self.head, self.head_key)]

    def momentum(self, progress: float) -> float:
        m = self.cfg.objective.momentum
        return cosine(m, 1.0, progress) if self.cfg.objective.momentum_cosine else m

    # ------------------------------------------------------------------------------ queue ----
    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write the normalised keys of every process (rank order) at ``queue_ptr``, wrapping."""
        keys = gather_cat(keys.detach().to(self.queue.dtype), grad=False)
        k = self.queue.shape[0]
        idx = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % k
        self.queue[idx] = keys
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % k)

    # ------------------------------------------------------------------------------- loss ----
    @torch.no_grad()
    def keys(self, views: torch.Tensor) -> torch.Tensor:
        if self.cfg.model.channels_last:  # the trainer's input hook sits on the query backbone only
            views = views.contiguous(memory_format=torch.channels_last)
        k = self.head_key(self.backbone_key(views))
        return F.normalize(k.to(torch.promote_types(k.dtype, torch.float32)), dim=1)

    def loss_from_views(self, v0: torch.Tensor, v1: torch.Tensor, generator=None,
                        epoch: float = math.inf):
        oc = self.cfg.objective
        q = self.head(self.backbone(v0))
        k = self.keys(v1)
        with torch.autocast(device_type=q.device.type, enabled=False):
            q = q.to(torch.promote_types(q.dtype, torch.float32))
            k = k.to(q.dtype)
            queries, keys, metrics = q, k, {}
            if self.hallucinator is not None:
                h, lam = self.hallucinator(q, k, generator)
                queries, keys = torch.cat([q, h]), torch.cat([k, k])
                metrics["halluc_lambda"] = lam
            qn = F.normalize(queries, dim=1)
            pos = (qn * keys).sum(1)
            queue = self.queue.clone().to(qn.dtype)  # enqueue below must not touch saved tensors
            neg = qn @ queue.T
            extra = None
            if self.mixer.active(epoch):
                extra, mixed = self.mixer.extra_similarities(qn, queue, neg, generator)
                metrics["mochi_hard_sim"] = neg.detach().gather(1, mixed.hard).mean()
            loss = contrastive_logits_loss(pos, neg, extra, oc.loss, oc.temperature, oc.sigma)
        # the Hallucinator's published variant enqueues the duplicated keys [k; k]
        self.enqueue(torch.cat([k, k]) if self.hallucinator is not None and oc.hallucinator.enqueue_twice else k)
        with torch.no_grad():
            metrics.update(pos_sim=pos[: len(q)].mean(), neg_sim=neg[: len(q)].mean(),
                           z_std=qn[: len(q)].std(0).mean())
        return loss, metrics

    def forward(self, batch, generator):
        epoch = batch.get("epoch", math.inf)  # the trainer sets it; callers without it get mixing
        if "views" in batch:
            return self.loss_from_views(*batch["views"], generator=generator, epoch=epoch)
        views = batch["image"]  # (B, 2, 3, S, S): two crops per image, cut by the loader
        v0, v1 = self.augment(views[:, 0], generator), self.augment(views[:, 1], generator)
        return self.loss_from_views(v0, v1, generator=generator, epoch=epoch)
