"""I-JEPA (Assran et al. 2023): predict the target encoder's representations of masked image
blocks from a context block, in latent space (docs/methods.md §3).

Pieces, following the official code (``facebookresearch/ijepa``):

* **Encoders**: the backbone is a timm ViT without class token (``model.kwargs``:
  ``class_token: false, global_pool: avg, fc_norm: false`` — the last keeps timm's final norm on
  the tokens, where the official encoder has it). lightly's ``MaskedVisionTransformerTIMM`` runs it
  on the kept context tokens only. Positional embeddings are fixed 2-D sin-cos. The target encoder
  is a copy updated only by the trainer's EMA (:meth:`momentum_pairs`), momentum linear
  0.996 → 1.0 over training (:meth:`momentum`; the trainer passes the progress *before* the step,
  so the first update uses exactly 0.996, as the official ``momentum_scheduler``'s first value).
* **Masks** (:mod:`selfsup.objectives.ijepa_masks`): 4 target blocks of one size per batch, one
  context block without the targets. They are drawn here on the CPU, from the trainer's
  checkpointed per-rank generator (positions) and a generator seeded by ``run.seed`` and a
  checkpointed call counter (sizes, the same on every rank): a resumed run draws the same masks,
  which the official data-loader collator cannot promise.
* **Targets**: the full image through the target encoder, layer norm without affine over the
  feature dimension, then the target patches gathered: (M·B, n_tgt, D).
* **Predictor**: lightly's ``IJEPAPredictorTIMM`` (narrow ViT, mask tokens at the target positions,
  one sequence per target block). Loss: smooth L1 as the official code (``loss: mse`` for the
  paper's squared L2), in fp32.
* **Init** (:func:`official_init`), as the official training code leaves the weights: every
  Linear and the patch-embedding conv truncated normal (σ = 0.02), zero biases, LayerNorms 1 / 0,
  the predictor's mask token truncated normal (σ = 0.02), in the encoder *and* the predictor
  (lightly's predictor keeps PyTorch's default Linear init and a zero mask token). The official
  constructors also divide block ℓ's output projections by √(2ℓ) (``fix_init_weight``), but
  ``src/helper.py:init_model`` re-draws every Linear afterwards, which undoes it;
  ``rescale_init: true`` applies the rescaling (a departure kept as the benchmark arm that
  measures what the official init costs or gains). σ = 0.02 on the patch
  conv is tuned to the paper's 16×16×3 patches (fan-in 768: it is then also PyTorch's default
  scale); on small patches it shrinks the image content against the fixed sin-cos positions
  (4×4×3: 4× smaller). ``patch_embed_init: fan_in`` keeps the paper's output scale instead,
  σ = 0.02·√(768 / fan-in) (identical to the official init at 16×16×3; docs/methods.md §3.8).

The optimiser (AdamW, weight decay cosine 0.04 → 0.4 via ``optim.weight_decay_end``, no decay on
biases and norms) and the lr schedule are the trainer's. The export (and the online monitor) is
the *target* encoder by default, as the paper evaluates ("We use the target-encoder for
evaluation and average pool its output", Appendix A.1), pooled as the mean of its patch tokens
(``pool: mean_patch``); ``export: context`` exports the context encoder instead.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import List

import torch
import torch.nn.functional as F
from lightly.models.modules import IJEPAPredictorTIMM, MaskedVisionTransformerTIMM
from lightly.models.utils import apply_masks, deactivate_requires_grad, repeat_interleave_batch
from timm.models.vision_transformer import VisionTransformer

from selfsup.augment import BatchAugment, to_device_async
from selfsup.views import ViewSpec
from selfsup.errors import RecipeError
from selfsup.objectives.base import Objective, register
from selfsup.objectives.ijepa_masks import MultiBlockMasks
from selfsup.schema import STRUCTURAL, at_least, key, one_of, pair, probability

LOSSES = ("smooth_l1", "mse")
EXPORTS = ("target", "context")
PATCH_INITS = ("official", "fan_in")
PAPER_PATCH_FAN_IN = 16 * 16 * 3  # the patch the official σ 0.02 was chosen for


def official_init(module: torch.nn.Module, std: float = 0.02) -> None:
    """The official ``_init_weights`` / ``init_model``: Linear and Conv2d weights truncated normal
    (σ = ``std``, cut at ±2 absolute as theirs), zero biases, LayerNorm weight 1 and bias 0."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                torch.nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, torch.nn.LayerNorm):
                torch.nn.init.ones_(m.weight)
                torch.nn.init.zeros_(m.bias)


def fan_in_patch_init(conv: torch.nn.Conv2d, std: float = 0.02) -> None:
    """The patch conv truncated normal with σ = ``std``·√(768 / fan-in): the output scale σ 0.02
    gives the paper's 16×16×3 patches, kept at any patch size (bias stays zero)."""
    fan_in = conv.weight[0].numel()
    with torch.no_grad():
        torch.nn.init.trunc_normal_(conv.weight, std=std * (PAPER_PATCH_FAN_IN / fan_in) ** 0.5)


def fix_init_weight(blocks) -> None:
    """Official rescaling: attention and MLP output projections of block ℓ (1-based) / √(2ℓ)."""
    with torch.no_grad():
        for layer, block in enumerate(blocks, start=1):
            block.attn.proj.weight.div_((2.0 * layer) ** 0.5)
            block.mlp.fc2.weight.div_((2.0 * layer) ** 0.5)


@register("ijepa")
class IJEPA(Objective):
    export_pool = "mean_patch"
    backbone_entry = None  # lightly's masked encoder calls the ViT's blocks: compile_step below

    @dataclass
    class Config:
        name: str = key("ijepa", "the objective", resume=STRUCTURAL)
        pred_depth: int = key(6, "predictor depth (the official code's default; its ViT-H configs use 12)",
                              check=at_least(1))
        pred_dim: int = key(384, "predictor width", check=at_least(1))
        pred_heads: int = key(0, "predictor heads (0: the encoder's head count, official)", check=at_least(0))
        num_targets: int = key(4, "target blocks per image", check=at_least(1))
        target_scale: List[float] = key(doc="target block area range", check=pair(0, 1),
                                        factory=lambda: [0.15, 0.2])
        target_aspect: List[float] = key(doc="target block aspect range", check=pair(1e-3, 1e3),
                                         factory=lambda: [0.75, 1.5])
        num_context: int = key(1, "context blocks per image", check=at_least(1))
        context_scale: List[float] = key(doc="context block area range", check=pair(0, 1),
                                         factory=lambda: [0.85, 1.0])
        min_keep: int = key(10, "fewest patches a block keeps", check=at_least(1))
        allow_overlap: bool = key(False, "let the context overlap the targets")
        loss: str = key("smooth_l1", "`smooth_l1` (official code) or `mse` (the paper's L2)",
                        check=one_of(*LOSSES))
        momentum: float = key(0.996, "target-encoder EMA start", check=probability())
        momentum_end: float = key(1.0, "target-encoder EMA end (linear schedule)", check=probability())
        export: str = key("target", "encoder exported and monitored: `target` (EMA; the paper evaluates it) or "
                          "`context`", check=one_of(*EXPORTS))
        rescale_init: bool = key(False, "`true`: block ℓ's output projections / √(2ℓ), as the official "
                                 "constructors before `init_model` undoes it (an ablation arm)")
        patch_embed_init: str = key("official", "`official` (σ 0.02) or `fan_in` (σ 0.02·√(768/fan-in): the "
                                    "paper's 16×16×3 output scale on smaller patches)",
                                    check=one_of(*PATCH_INITS))

    def __init__(self, cfg, backbone):
        super().__init__(cfg, backbone)
        oc = cfg.objective
        self._check(cfg, backbone)
        grid = backbone.patch_embed.grid_size
        self.augment = BatchAugment.from_config(cfg.augment)
        try:
            self.masks = MultiBlockMasks(grid, oc.num_targets, oc.target_scale, oc.target_aspect,
                                         oc.num_context, oc.context_scale, oc.min_keep, oc.allow_overlap)
        except ValueError as e:
            raise RecipeError(f"objective ijepa: {e} (objective.min_keep, objective.target_scale)") from None
        official_init(backbone)
        if oc.rescale_init:
            fix_init_weight(backbone.blocks)
        if oc.patch_embed_init == "fan_in":
            fan_in_patch_init(backbone.patch_embed.proj)
        # sin-cos positions, fixed as in the official encoder; the unused mask token stays frozen
        self.encoder = MaskedVisionTransformerTIMM(backbone, weight_initialization="skip",
                                                   pos_embed_initialization="sincos")
        del self._modules["backbone"]  # reached as encoder.vit: one copy in checkpoints
        backbone.pos_embed.requires_grad_(False)
        self.encoder.mask_token.requires_grad_(False)
        heads = oc.pred_heads or backbone.blocks[0].attn.num_heads
        self.predictor = IJEPAPredictorTIMM(num_patches=grid[0] * grid[1], depth=oc.pred_depth,
                                            mlp_dim=backbone.embed_dim,
                                            predictor_embed_dim=oc.pred_dim, num_heads=heads)
        official_init(self.predictor)
        with torch.no_grad():
            torch.nn.init.trunc_normal_(self.predictor.decoder.mask_token, std=0.02)
        if oc.rescale_init:
            fix_init_weight(self.predictor.decoder.blocks)
        self.target = copy.deepcopy(self.encoder)
        deactivate_requires_grad(self.target)
        self.size_seed = int(cfg.run.seed) * 1_000_003
        self.register_counter("mask_calls")  # checkpointed
        self._export_target = oc.export == "target"
        self._mse = oc.loss == "mse"  # read once: a traced step should not walk the OmegaConf tree
        self._compiled_loss = None

    @property
    def backbone(self) -> VisionTransformer:
        """The ViT the trainer exports and the monitor evaluates: the target (EMA) encoder's
        (``export: target``, the paper's choice) or the context encoder's (``export: context``).
        Training reaches the encoders as ``encoder`` and ``target``, never through this."""
        return (self.target if self._export_target else self.encoder).vit

    def online_backbone(self) -> VisionTransformer:
        """The context encoder's ViT: the one that trains (the target is its EMA copy)."""
        return self.encoder.vit

    @staticmethod
    def _check(cfg, backbone) -> None:
        oc = cfg.objective
        if not isinstance(backbone, VisionTransformer):
            raise RecipeError(f"objective ijepa needs a timm ViT (model.name: vit_*), not "
                              f"{type(backbone).__name__} ({cfg.model.name})")
        if backbone.num_prefix_tokens:
            raise RecipeError("objective ijepa: the ViT must have no class/register tokens; set "
                              "model.kwargs.class_token=false and model.kwargs.global_pool=avg")
        if isinstance(backbone.norm, torch.nn.Identity):
            raise RecipeError("objective ijepa: the ViT's final norm is on the pooled feature "
                              "(timm's fc_norm); set model.kwargs.fc_norm=false")
        grid = backbone.patch_embed.grid_size
        if cfg.augment.size != backbone.patch_embed.img_size[0]:
            raise RecipeError(f"augment.size={cfg.augment.size} but the ViT is built for "
                              f"{backbone.patch_embed.img_size[0]} px: set model.kwargs.img_size="
                              f"{cfg.augment.size}")
        if not 0 <= oc.min_keep < grid[0] * grid[1] // 2:
            raise RecipeError(f"objective.min_keep={oc.min_keep} leaves no room on the "
                              f"{grid[0]}x{grid[1]} patch grid")
        if oc.momentum > oc.momentum_end:
            raise RecipeError("objective.momentum <= objective.momentum_end <= 1 is required")
        if oc.pred_dim % (oc.pred_heads or backbone.blocks[0].attn.num_heads):
            raise RecipeError(f"objective.pred_dim={oc.pred_dim} is not divisible by the predictor's "
                              "head count (objective.pred_heads, default the encoder's)")

    def momentum_pairs(self):
        return [(self.encoder, self.target)]

    def momentum(self, progress: float) -> float:
        oc = self.cfg.objective
        return oc.momentum + (oc.momentum_end - oc.momentum) * min(max(progress, 0.0), 1.0)

    def sample_masks(self, batch_size: int, generator: torch.Generator):
        """(context, targets) index lists for this batch; advances the checkpointed counter."""
        size_gen = torch.Generator().manual_seed(self.size_seed + self.next_count("mask_calls"))
        return self.masks(batch_size, size_gen, generator)

    @torch.no_grad()
    def targets(self, images: torch.Tensor, targets: list[torch.Tensor], repeat: int) -> torch.Tensor:
        h = self.target.encode(images)
        h = F.layer_norm(h.float(), (h.shape[-1],))  # no affine, over the feature dimension
        return repeat_interleave_batch(apply_masks(h, targets), len(images), repeat=repeat)

    def predict(self, images, context: list[torch.Tensor], targets: list[torch.Tensor]):
        z = torch.cat([self.encoder.encode(images, idx_keep=m) for m in context])
        return self.predictor(z, context, targets)

    def _loss(self, images, context, targets):
        """Loss and the predictions' mean per-dimension std (a collapse indicator), the part of
        the step that ``model.compile`` compiles: target encoder, context encoder, predictor."""
        h = self.targets(images, targets, repeat=len(context))
        z = self.predict(images, context, targets).float()
        loss = F.mse_loss(z, h) if self._mse else F.smooth_l1_loss(z, h)
        return loss, z.detach().std(0).mean()

    def compile_step(self) -> None:
        """``model.compile``: the encoders and the predictor, compiled as one graph around
        :meth:`_loss` (lightly's masked encoder runs the ViT's blocks itself, so compiling the
        backbone's ``forward`` changed nothing). The mask lengths change from batch to batch; they
        are marked dynamic (:meth:`loss_from_masks`), so one graph serves every length instead of
        a recompile per batch, and the masks stay exactly those drawn."""
        self._compiled_loss = torch.compile(self._loss)

    def loss_from_masks(self, images, context, targets):
        if self._compiled_loss is None:
            loss, pred_std = self._loss(images, context, targets)
        else:
            for m in (*context, *targets):  # (B, K): K symbolic from the first call on
                torch._dynamo.maybe_mark_dynamic(m, 1)
            loss, pred_std = self._compiled_loss(images, context, targets)
        metrics = {"context_len": float(context[0].shape[1]), "target_len": float(targets[0].shape[1]),
                   "pred_std": pred_std, "mask_relaxed": float(self.masks.relaxed)}
        return loss, metrics

    def views(self) -> list[ViewSpec]:
        """One ``RandomResizedCrop(augment.size, augment.scale)`` view (official: scale 0.3-1)."""
        return super().views()[:1]

    def forward(self, batch, generator):
        images = self.augment(batch["image"][:, 0], generator)
        context, targets = self.sample_masks(len(images), generator)
        # one pinned, non_blocking copy for all the masks: no host sync, one copy instead of five
        flat = torch.cat([m.flatten() for m in (*context, *targets)])
        masks = [m.view(len(images), -1) for m in to_device_async(flat, images.device).split(
            [m.numel() for m in (*context, *targets)])]
        context, targets = masks[:len(context)], masks[len(context):]
        return self.loss_from_masks(images, context, targets)
