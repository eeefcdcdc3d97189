"""Jigsaw Clustering (Chen, Liu, Jia, CVPR 2021): one forward pass per step over montages of patches
from different images; the network learns which image (clustering) and which quadrant (location)
every patch came from (docs/methods.md §4).

Following the official code (``dvlab-research/JigsawClustering``):

* **Patches**: each original image is cut into 4 overlapping quadrants, each extending
  ``cross_ratio`` of the side past the midline (0.3 → patches of 0.8 × the side), in the order
  (TL, BL, TR, BR); the loader crops each quadrant with ``RandomResizedCrop`` at half the montage
  size (:meth:`JigClu.views`), and each patch gets the rest of the recipe's ``augment`` (MoCo-v2
  style) independently.
* **Montage**: the patches of the whole global batch (gathered from every process, no gradient)
  form G = [P0; P1; P2; P3] of length 4n (index t = patch of image t mod n from quadrant t div n).
  One permutation of 4n, the same on every process, shuffles G; montage j tiles G[j] (top-left),
  G[n+j] (top-right), G[2n+j] (bottom-left), G[3n+j] (bottom-right). Each process encodes its own
  slice of the n montages: one backbone forward of B images per step.
  The permutation is drawn from a generator seeded by ``run.seed`` and a checkpointed call counter,
  so 1 and 2 processes with the same global batch use the same permutation and a resumed run the
  one it would have used (the official code draws it on rank 0 and broadcasts).
* **Tile features**: the backbone's last feature map (ViT tokens reshaped to their grid), resized
  bilinearly to an even grid when odd (official: 7×7 → 8×8, else a 2×2 pooling would share the
  centre row/column between tiles), then average-pooled 2×2. Cells (0,0), (0,1), (1,0), (1,1) of
  montage j are rows j, n+j, 2n+j, 3n+j, i.e. the order of the permuted G. Gathered from every
  process with gradient. A backbone whose last map at the montage size is under 2×2 is refused
  (the four tiles would share one feature).
* **Losses**: clustering = supervised contrastive loss (SupCon, all anchors, the anchor itself
  excluded from the denominator) of the L2-normalised MLP projections, positives = the other three
  patches of the same image (label = permutation mod n), scaled by ``temperature /
  base_temperature`` (the official 0.3 / 0.07 ≈ 4.29, kept by default because the official lr of
  0.03 is tuned with it); location = cross-entropy of a linear head on the original quadrant
  (label = permutation div n, not the montage cell). Each process computes the loss of its own
  anchors against all 4n; with DDP's gradient averaging this is the gradient of the global loss.

The exported backbone is used like any other (global pooling on whole images).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lightly.utils import dist
from torch import nn

from selfsup.augment import BatchAugment
from selfsup.views import ViewSpec
from selfsup.errors import RecipeError
from selfsup.losses import gather_cat
from selfsup.objectives.base import Objective, full_precision, register
from selfsup.schema import STRUCTURAL, at_least, below, key, positive


def montage(g: torch.Tensor, n: int) -> torch.Tensor:
    """n montages from 4n patches (already permuted): tiles G[j] | G[n+j] over G[2n+j] | G[3n+j]."""
    top = torch.cat([g[:n], g[n:2 * n]], dim=-1)
    bottom = torch.cat([g[2 * n:3 * n], g[3 * n:]], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def feature_map(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) last feature map of a timm CNN (NHWC models such as Swin permuted back), or a
    ViT's patch tokens on their grid. The grid comes from the input size, not ``grid_size``: a ViT
    built with ``dynamic_img_size`` (timm's test_vit) may be fed montages of another size."""
    f = backbone.forward_features(x)
    if f.ndim == 3:  # ViT: (B, prefix + h*w, C)
        f = f[:, getattr(backbone, "num_prefix_tokens", 0):]
        pe = backbone.patch_embed
        gh, gw = pe.dynamic_feat_size(x.shape[-2:]) if hasattr(pe, "dynamic_feat_size") else pe.grid_size
        f = f.transpose(1, 2).reshape(len(f), -1, gh, gw)
    elif getattr(backbone, "output_fmt", "NCHW") == "NHWC":
        f = f.permute(0, 3, 1, 2)
    return f


def freeze_unused(backbone: nn.Module, size: int) -> list[str]:
    """Freeze the backbone parameters that :func:`feature_map` never uses (timm's pooling-head
    norms: ConvNeXt's ``head.norm``, a ViT's ``fc_norm``). DDP waits for a gradient of every
    trainable parameter before it averages any, so one that never gets one silently stops the
    gradient sync of the first step and fails the second. Returns their names.

    The same probe checks the montage size: a map smaller than 2x2 (an ImageNet-stem ResNet on a
    32 px montage ends on 1x1) would give the four tiles one identical feature, and a ViT built for
    another image size cannot take the montage at all; both are recipe errors, said in one line."""
    was = backbone.training
    backbone.eval()
    try:
        with torch.enable_grad():
            out = feature_map(backbone, torch.zeros(1, 3, size, size))
            if out.requires_grad:
                out.sum().backward()
    except (RuntimeError, AssertionError, ValueError) as e:
        msg = " ".join(str(e).split())
        raise RecipeError(f"model cannot encode augment.size={size} montages: {msg}") from None
    finally:
        backbone.train(was)
    if min(out.shape[-2:]) < 2:
        raise RecipeError(f"the last feature map of a {size} px montage is {out.shape[-2]}x{out.shape[-1]}; "
                          "the 2x2 tiles need at least 2x2: raise augment.size or set model.small_stem=true")
    unused = [name for name, p in backbone.named_parameters() if p.requires_grad and p.grad is None]
    for name, p in backbone.named_parameters():
        p.grad = None
        if name in unused:
            p.requires_grad_(False)
    return unused


def tile_features(fmap: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (4B, C): cells (0,0), (0,1), (1,0), (1,1) of every montage, cell-major."""
    h, w = fmap.shape[-2:]
    if h % 2 or w % 2:  # an odd grid would share its centre row/column between tiles
        fmap = F.interpolate(fmap, size=(h + h % 2, w + w % 2), mode="bilinear", align_corners=False)
    cells = F.adaptive_avg_pool2d(fmap, 2)  # (B, C, 2, 2)
    return cells.flatten(2).permute(2, 0, 1).reshape(-1, fmap.shape[1])


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float, anchors: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., 'all' mode) of L2-normalised rows ``z``: for each
    anchor a, the mean over its positives p (same label, p ≠ a) of −log softmax over all o ≠ a.
    ``anchors`` (indices into z) restricts the anchors (one process's share); mean over them."""
    idx = torch.arange(len(z), device=z.device) if anchors is None else anchors
    logits = z[idx] @ z.T / temperature
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[torch.arange(len(idx)), idx] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (labels[idx, None] == labels[None, :]) & ~self_mask
    return -(log_prob.masked_fill(~pos, 0).sum(1) / pos.sum(1)).mean()


@register("jigclu")
class JigClu(Objective):
    backbone_entry = "forward_features"  # tiles are cut from the feature map
    in_batch_negatives = True  # SupCon over the micro-batch's tiles

    @dataclass
    class Config:
        name: str = key("jigclu", "the objective", resume=STRUCTURAL)
        cross_ratio: float = key(0.3, "overlap of the quadrants, as a share of the image side",
                                 check=below(0, 0.5))
        proj_hidden_dim: int = key(2048, "clustering head width", check=at_least(1))
        proj_dim: int = key(128, "clustering head output dimension", check=at_least(1))
        temperature: float = key(0.3, "clustering loss τ (official --loss-t)", check=positive())
        base_temperature: float = key(0.07, "official SupCluLoss constant: loss × τ / base", check=positive())
        w_clu: float = key(1.0, "weight of the clustering loss", check=at_least(0))
        w_loc: float = key(1.0, "weight of the location loss", check=at_least(0))

    def __init__(self, cfg, backbone):
        super().__init__(cfg, backbone)
        oc = cfg.objective
        if cfg.augment.size % 2:
            raise RecipeError(f"augment.size={cfg.augment.size} must be even: montages are 2x2 tiles of "
                              "augment.size/2 patches")
        self.augment = BatchAugment.from_config(cfg.augment, cfg.augment.size // 2)
        dim = backbone.num_features
        self.clu_head = nn.Sequential(nn.Linear(dim, oc.proj_hidden_dim), nn.ReLU(inplace=True),
                                      nn.Linear(oc.proj_hidden_dim, oc.proj_dim))
        self.loc_head = nn.Linear(dim, 4)
        self.frozen = freeze_unused(backbone, cfg.augment.size)
        self.perm_seed = int(cfg.run.seed) * 1_000_003 + 17
        self.register_counter("perm_calls")  # checkpointed

    def permutation(self, total: int) -> torch.Tensor:
        """This step's permutation of the 4n patches (a CPU tensor). Not the trainer's generator:
        that one is seeded per rank, and drawing from it would also make the permutation depend
        on the process count. A fresh generator per call, seeded by ``run.seed`` and the number of
        calls so far (a checkpointed counter, read on the host), is identical on every process
        with no broadcast, for 1 or N processes of the same global batch, and across a resume."""
        g = torch.Generator().manual_seed(self.perm_seed + self.next_count("perm_calls"))
        return torch.randperm(total, generator=g)

    def views(self) -> list[ViewSpec]:
        """One ``RandomResizedCrop(augment.size / 2, augment.scale, augment.ratio)`` inside each
        of the four quadrants of the original image, in the official order (TL, BL, TR, BR)."""
        aug, cross = self.cfg.augment, self.cfg.objective.cross_ratio
        return [ViewSpec(aug.size // 2, tuple(aug.scale), tuple(aug.ratio), quadrant=q, cross=cross)
                for q in range(4)]

    def patches(self, views: torch.Tensor, generator) -> torch.Tensor:
        """(4B, 3, s/2, s/2): the (B, 4, 3, s/2, s/2) quadrant crops, augmented independently,
        quadrant-major ([P0; P1; P2; P3])."""
        return torch.cat([self.augment(views[:, q], generator) for q in range(4)])

    def tiles(self, p: torch.Tensor):
        """Montage this step's patches and encode this process's montages.

        Returns ``(feats, perm, mine)``: the (4b, C) features of this process's tiles, ``perm``
        (4n; the G index at each row of the global order, where row c·n + j is cell c of montage
        j) and ``mine``, the global rows of this process's tiles (the rows of ``feats``)."""
        b = len(p) // 4
        world, rank = dist.world_size(), dist.rank()
        n = b * world
        # G = [P0; P1; P2; P3] of the global batch: quadrant q of global image i is G[q·n + i]
        g = gather_cat(p.reshape(4, b, *p.shape[1:]).transpose(0, 1).contiguous(), grad=False)  # (n, 4, ...)
        g = g.transpose(0, 1).reshape(4 * n, *p.shape[1:])
        self.permutation_log = self.permutation(4 * n)  # the last permutation, for inspection and tests
        perm = self.permutation_log.to(p.device)
        own = perm.view(4, n)[:, rank * b:(rank + 1) * b].reshape(-1)  # the cells of montages rank·b...
        feats = tile_features(feature_map(self.backbone, montage(g[own], b)))  # only this process's b
        mine = (torch.arange(4, device=p.device)[:, None] * n + rank * b
                + torch.arange(b, device=p.device)[None, :]).reshape(-1)
        return feats, perm, mine

    @staticmethod
    def gather_rows(x: torch.Tensor) -> torch.Tensor:
        """(4b, D) cell-major rows of every process → (4n, D) in the global order, with gradient."""
        b = len(x) // 4
        g = gather_cat(x.reshape(4, b, -1).transpose(0, 1).contiguous())  # (n, 4, D), rank order
        return g.transpose(0, 1).reshape(-1, x.shape[-1])

    def loss_from_patches(self, p: torch.Tensor):
        oc = self.cfg.objective
        feats, perm, mine = self.tiles(p)
        n = len(perm) // 4
        with full_precision(feats):  # heads and losses in fp32, as upstream, under bf16 autocast
            feats = feats.to(torch.promote_types(feats.dtype, torch.float32))
            # the head runs on local rows, then the embeddings are gathered (as SimCLR's are): the
            # gradient of the global loss then reaches each process's backbone through DDP as is
            z = self.gather_rows(F.normalize(self.clu_head(feats), dim=1))
            clu_label, loc_label = perm % n, perm // n
            loss_clu = supcon_loss(z, clu_label, oc.temperature, mine) * (oc.temperature / oc.base_temperature)
            loc_logits = self.loc_head(feats)
            loss_loc = F.cross_entropy(loc_logits, loc_label[mine])
        with torch.no_grad():
            loc_acc = (loc_logits.argmax(1) == loc_label[mine]).float().mean()
        return oc.w_clu * loss_clu + oc.w_loc * loss_loc, {"loss_clu": loss_clu.detach(),
                                                           "loss_loc": loss_loc.detach(), "loc_acc": loc_acc}

    def forward(self, batch, generator):
        if "patches" in batch:  # patches made elsewhere ([P0; P1; P2; P3] of the local images): tests
            return self.loss_from_patches(batch["patches"])
        return self.loss_from_patches(self.patches(batch["image"], generator))
