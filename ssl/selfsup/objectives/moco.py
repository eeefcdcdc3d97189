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
* **BatchNorm** (:mod:`selfsup.objectives.shuffle_bn`): as MoCo-v2, the key batch is shuffled
  across processes before the key encoder and unshuffled after (``shuffle_bn``), and every
  process's BatchNorm sees only its own images (no SyncBatchNorm: :meth:`sync_batchnorm`).
  ``bn_splits = S`` splits each process's batch into S BatchNorm groups in both encoders, so one
  process emulates S GPUs (``moco.yaml``: 8 groups of 32 at batch 256, MoCo-v2's 8 GPUs × 32).
  ``shuffle_bn: false, bn_splits: 1`` is selfsup's earlier behaviour (one process: the key
  encoder's BN sees the whole key batch; several GPUs: SyncBatchNorm). The MoCo-v2 head
  (Linear–ReLU–Linear) has no BN.
* **MoCHi** (``objective.mochi``): extra per-query negatives mixed from that query's hardest
  queue entries (:mod:`selfsup.objectives.mixing`), never enqueued. One warning line when mixing
  would start before the queue holds real keys only (:meth:`_check_mixing_start`); with the
  online monitor on and labelled shards, the metric ``mochi_hard_same_class`` is the share of
  the hardest queue entries that have the query's class (the queue keeps the keys' labels).
* **Hallucinator** (``objective.hallucinator``): queries ``[q; h]`` against keys ``[k; k]``, and
  ``[k; k]`` enqueued as the authors' code (``enqueue_twice: false``: each key once;
  :mod:`selfsup.objectives.hallucinator`).

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
from selfsup.errors import RecipeError, warn
from selfsup.losses import LOSSES, contrastive_logits_loss, gather_cat
from selfsup.objectives.base import Objective, full_precision, register
from selfsup.objectives.hallucinator import Hallucinator, HallucinatorConfig
from selfsup.objectives.mixing import (HardNegativeMixer, MochiConfig, check_mochi, monitor_has_labels,
                                       same_class_share)
from selfsup.objectives.shuffle_bn import has_batchnorm, shuffled_keys, split_batchnorm
from selfsup.schedules import cosine
from selfsup.schema import STRUCTURAL, at_least, key, one_of, positive, probability


@register("moco")
class MoCo(Objective):
    @dataclass
    class Config:
        name: str = key("moco", "the objective", resume=STRUCTURAL)
        loss: str = key("infonce", "over [key | queue]: `infonce` (MoCo's); `dcl`, `dclw` are departures",
                        check=one_of(*LOSSES))
        temperature: float = key(0.2, "τ", check=positive())
        sigma: float = key(0.5, "DCLW's weight temperature σ", check=positive())
        queue_size: int = key(65536, "queue length K (at least the keys enqueued per step)", check=at_least(1))
        momentum: float = key(0.999, "key-encoder EMA momentum", check=probability())
        momentum_cosine: bool = key(False, "cosine schedule from `momentum` to 1.0 over training")
        proj_hidden_dim: int = key(2048, "projection head width", check=at_least(1))
        proj_dim: int = key(128, "projection output dimension", check=at_least(1))
        proj_layers: int = key(2, "projection head layers", check=at_least(1))
        proj_batch_norm: bool = key(False, "BatchNorm in the projection head (MoCo-v2: none)")
        shuffle_bn: bool = key(True, "shuffle the key batch across processes around the key encoder (MoCo's "
                               "shuffle-BN; on one process with `bn_splits: 1` it changes nothing); `false` is "
                               "a departure kept as an ablation arm")
        bn_splits: int = key(1, "BatchNorm groups per process in both encoders (split-BN; `moco.yaml`: 8)",
                             check=at_least(1))
        mochi: MochiConfig = field(default_factory=MochiConfig)
        hallucinator: HallucinatorConfig = field(default_factory=HallucinatorConfig)

    def __init__(self, cfg, backbone):
        super().__init__(cfg, backbone)
        oc = cfg.objective
        global_batch = cfg.train.batch_size * dist.world_size()
        if oc.hallucinator.enabled and oc.hallucinator.enqueue_twice:
            global_batch *= 2  # [k; k] enqueued
        self._keys_per_step = global_batch
        if oc.queue_size < global_batch:
            raise RecipeError(f"objective.queue_size={oc.queue_size} is smaller than the "
                              f"{global_batch} keys enqueued every step")
        check_mochi(oc.mochi, oc.queue_size, "queue entries")
        if oc.bn_splits < 1 or cfg.train.batch_size % oc.bn_splits:
            raise RecipeError(f"objective.bn_splits={oc.bn_splits} must be >= 1 and divide "
                              f"train.batch_size={cfg.train.batch_size}")
        self.augment = BatchAugment.from_config(cfg.augment)
        self.head = MoCoProjectionHead(backbone.num_features, oc.proj_hidden_dim, oc.proj_dim,
                                       oc.proj_layers, oc.proj_batch_norm)
        split_batchnorm(backbone, oc.bn_splits)  # before the copy: the key encoder gets it too
        split_batchnorm(self.head, oc.bn_splits)
        bn = has_batchnorm(backbone) or has_batchnorm(self.head)
        # per-process BatchNorm (MoCo): the trainer must not convert it to SyncBatchNorm
        self._group_bn = bn and (oc.shuffle_bn or oc.bn_splits > 1)
        # shuffling matters only with BatchNorm and more than one group of keys
        self._shuffle = bn and oc.shuffle_bn and (dist.world_size() > 1 or oc.bn_splits > 1)
        self.backbone_key = copy.deepcopy(backbone)
        self.head_key = copy.deepcopy(self.head)
        deactivate_requires_grad(self.backbone_key)
        deactivate_requires_grad(self.head_key)
        # the same seed on every process (the trainer seeds before building) → the same queue
        self.register_buffer("queue", F.normalize(torch.randn(oc.queue_size, oc.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_counter("enqueue_calls")  # checkpointed: when the random entries are gone
        # the keys' class labels (-1: unknown), for the same-class share of MoCHi's hard
        # negatives; not checkpointed (a resumed run relearns them as the queue turns over)
        self._label_hard = oc.mochi.s + oc.mochi.s_prime > 0 and monitor_has_labels(cfg)
        self.register_buffer("queue_label", torch.full((oc.queue_size,), -1, dtype=torch.long),
                             persistent=False)
        self._mix_checked, self._last_epoch = False, None
        self.mixer = HardNegativeMixer(oc.mochi)
        self.hallucinator = (Hallucinator.from_config(oc.hallucinator, oc.proj_dim)
                             if oc.hallucinator.enabled else None)

    # ---------------------------------------------------------------- what the trainer uses --
    def backbones(self):
        return [self.backbone, self.backbone_key]

    def momentum_pairs(self):
        return [(self.backbone, self.backbone_key), (self.head, self.head_key)]

    def sync_batchnorm(self):
        """Per-process BatchNorm groups with shuffle-BN or split-BN, as MoCo; else SyncBatchNorm."""
        return self if self._group_bn else super().sync_batchnorm()

    def momentum(self, progress: float) -> float:
        m = self.cfg.objective.momentum
        return cosine(m, 1.0, progress) if self.cfg.objective.momentum_cosine else m

    # ------------------------------------------------------------------------------ queue ----
    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Write the normalised keys of every process (rank order) at ``queue_ptr``, wrapping;
        their labels too when given (the same rows on every process)."""
        keys = gather_cat(keys.detach().to(self.queue.dtype), grad=False)
        k = self.queue.shape[0]
        idx = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % k
        self.queue[idx] = keys
        if labels is not None:
            self.queue_label[idx] = gather_cat(labels.to(idx.device, torch.long), grad=False)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % k)
        self.next_count("enqueue_calls")

    def _check_mixing_start(self, epoch: float) -> None:
        """One warning line, once, when MoCHi would start mixing before the queue has been
        filled with real keys: its first mixes would be built from the random initial entries.
        Known at the first mixing step, or earlier from the epoch's advance per step (the second
        step of a run that mixes later)."""
        if self._mix_checked or not self.mixer.enabled or not math.isfinite(epoch):
            return
        calls, rate = self._host_counts["enqueue_calls"], None
        if self._last_epoch is not None and epoch > self._last_epoch:
            rate = epoch - self._last_epoch  # epochs per step
        self._last_epoch = epoch
        if self.mixer.active(epoch):
            at_start = calls
        elif rate is None:
            return
        else:
            at_start = calls + math.ceil((self.mixer.start_epoch - epoch) / rate - 1e-9)
        self._mix_checked = True
        k, kps = self.queue.shape[0], self._keys_per_step
        full = math.ceil(k / kps)  # steps until every random entry has been overwritten
        if at_start >= full or dist.rank() != 0:
            return
        need = f"; set objective.mochi.start_epoch >= {full * rate:.3g}" if rate else ""
        warn(f"MoCHi starts mixing after {at_start} steps (objective.mochi.start_epoch="
             f"{self.mixer.start_epoch:g}) but the {k}-key queue holds only real keys after {full} "
             f"({kps} keys a step): its first mixes are built from random vectors{need}")

    # ------------------------------------------------------------------------------- loss ----
    @torch.no_grad()
    def _encode_keys(self, views: torch.Tensor) -> torch.Tensor:
        if self.cfg.model.channels_last:  # the trainer's input hook sits on the query backbone only
            views = views.contiguous(memory_format=torch.channels_last)
        k = self.head_key(self.backbone_key(views))
        return F.normalize(k.to(torch.promote_types(k.dtype, torch.float32)), dim=1)

    @torch.no_grad()
    def keys(self, views: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised keys of ``views`` in their order; shuffle-BN draws its permutation from
        ``generator`` (the trainer's, checkpointed)."""
        if self._shuffle:
            return shuffled_keys(self._encode_keys, views, generator)
        return self._encode_keys(views)

    def loss_from_views(self, v0: torch.Tensor, v1: torch.Tensor, generator=None,
                        epoch: float = math.inf, labels: torch.Tensor | None = None):
        oc = self.cfg.objective
        self._check_mixing_start(epoch)
        labels = labels.to(v0.device, torch.long) if self._label_hard and labels is not None else None
        q = self.head(self.backbone(v0))
        k = self.keys(v1, generator)
        with full_precision(q):
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
                if labels is not None:  # [q; h] rows share their image's label
                    metrics["mochi_hard_same_class"] = same_class_share(
                        mixed.hard, labels.repeat(len(qn) // len(labels)), self.queue_label)
            loss = contrastive_logits_loss(pos, neg, extra, oc.loss, oc.temperature, oc.sigma)
        # the Hallucinator's published variant enqueues the duplicated keys [k; k]
        if self.hallucinator is not None and oc.hallucinator.enqueue_twice:
            k, labels = torch.cat([k, k]), None if labels is None else labels.repeat(2)
        self.enqueue(k, labels)
        with torch.no_grad():
            metrics.update(pos_sim=pos[: len(q)].mean(), neg_sim=neg[: len(q)].mean(),
                           z_std=qn[: len(q)].std(0).mean())
        return loss, metrics

    def forward(self, batch, generator):
        epoch = batch.get("epoch", math.inf)  # the trainer sets it; callers without it get mixing
        labels = batch.get("label")  # class labels of labelled shards (-1: none), for a metric only
        if "views" in batch:
            return self.loss_from_views(*batch["views"], generator=generator, epoch=epoch, labels=labels)
        views = batch["image"]  # (B, 2, 3, S, S): two crops per image, cut by the loader
        v0, v1 = self.augment(views[:, 0], generator), self.augment(views[:, 1], generator)
        return self.loss_from_views(v0, v1, generator=generator, epoch=epoch, labels=labels)
