"""MoCHi: hard negative mixing (Kalantidis et al., NeurIPS 2020), as a piece any contrastive
objective switches on from its recipe (``objective.mochi.*``; docs/methods.md §2).

For every anchor q (L2-normalised) and the pool of its negatives (MoCo's queue, or SimCLR's
gathered batch with the anchor's own image masked out):

1. the N hardest negatives: top-N of q·pool over that anchor's *valid* negatives (masked entries
   carry similarity ``-inf`` and are never picked while N ≤ the number of valid ones);
2. s points α·n_i + (1−α)·n_j, n_i, n_j drawn from *that anchor's* top-N, α ~ U(0, 1);
3. s′ points β·q + (1−β)·n_j, n_j from the same top-N, β ~ U(0, 0.5) (the query's share stays
   below one half, so the point is still a negative);
4. all re-normalised, and used only as extra negative logits q·h for that anchor.

The synthetic points are built under ``no_grad`` from detached tensors: gradient reaches the loss
only through the q factor of q·h, never through the pool or the mixed points (davidsvy's
reference detaches q inside h′ the same way). They are returned to the objective and never stored,
so nothing synthetic can reach a queue. Indices are gathered per anchor (``gather(hard, 1, j)``),
avoiding the reshape bug that mixes only the first query's negatives (docs/methods.md §2.5.2).

All random draws come from the ``generator`` the trainer passes to ``forward``: it is
checkpointed, so a resumed run mixes exactly as the uninterrupted one. Mixing starts once the
batch's epoch reaches ``start_epoch`` (a warm-up while the queue still holds random features).
With ``s = s′ = 0`` nothing is mixed and the objective computes its plain loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from selfsup.errors import RecipeError
from selfsup.schema import at_least, key


@dataclass
class MochiConfig:
    """``objective.mochi``: shared by every objective that supports hard negative mixing."""

    n: int = key(1024, "MoCHi: hardest negatives per anchor the mixes are drawn from", check=at_least(1))
    s: int = key(0, "MoCHi: mixes of two hard negatives per anchor (`s = s_prime = 0`: off)", check=at_least(0))
    s_prime: int = key(0, "MoCHi: mixes of the anchor with one hard negative (β < 0.5)", check=at_least(0))
    start_epoch: float = key(10.0, "MoCHi: no mixing before this epoch (0-based, fractional)", check=at_least(0))


@dataclass
class Mixed:
    """What :func:`mix_hard_negatives` made, indices into the pool (kept for tests and metrics)."""

    features: torch.Tensor  # (M, s + s′, D) unit-norm synthetic negatives, no grad
    hard: torch.Tensor  # (M, N) pool indices of each anchor's hardest negatives
    pairs: torch.Tensor  # (M, s, 2) pool indices mixed together (type 1)
    alpha: torch.Tensor  # (M, s)
    partner: torch.Tensor  # (M, s′) pool index mixed with the anchor (type 2)
    beta: torch.Tensor  # (M, s′), in [0, 0.5)


def check_mochi(cfg: MochiConfig, max_negatives: int | None = None, what: str = "negatives") -> None:
    """One-line errors for ``objective.mochi`` values that only the pool size can judge (each key's
    own range is checked with the recipe: :mod:`selfsup.schema`)."""
    if cfg.s + cfg.s_prime == 0:
        return
    if cfg.n < 1:
        raise RecipeError(f"objective.mochi.n must be >= 1 when mixing, not {cfg.n}")
    if max_negatives is not None and cfg.n > max_negatives:
        raise RecipeError(f"objective.mochi.n={cfg.n} exceeds the {max_negatives} {what} each "
                          "anchor has: lower it (or enlarge the pool)")


@torch.no_grad()
def mix_hard_negatives(anchors: torch.Tensor, pool: torch.Tensor, sim: torch.Tensor, n: int,
                       s: int, s_prime: int, generator: torch.Generator | None = None) -> Mixed:
    """Synthetic hard negatives for each of M anchors.

    ``anchors`` (M, D) and ``pool`` (K, D) are L2-normalised; ``sim`` (M, K) is anchors·poolᵀ
    with ``-inf`` where a pool entry is not a negative of that anchor.
    """
    anchors, pool, sim = anchors.detach(), pool.detach(), sim.detach()
    m, dev, dtype = anchors.shape[0], anchors.device, anchors.dtype
    valid = int((sim > float("-inf")).sum(1).min().item()) if m else n
    if n > valid:
        raise RecipeError(f"objective.mochi.n={n} exceeds the {valid} negatives an anchor has in "
                          "this step: lower it")
    hard = sim.topk(n, dim=1).indices

    def uniform(cols: int) -> torch.Tensor:
        return torch.rand((m, cols), generator=generator, dtype=dtype).to(dev)

    def pick(cols: int) -> torch.Tensor:  # random members of each anchor's own top-N
        j = torch.randint(n, (m, cols), generator=generator).to(dev)
        return torch.gather(hard, 1, j)

    pairs = pick(2 * s).view(m, s, 2)
    alpha = uniform(s)
    partner = pick(s_prime)
    beta = 0.5 * uniform(s_prime)
    a = alpha.unsqueeze(2)
    type1 = a * pool[pairs[..., 0]] + (1 - a) * pool[pairs[..., 1]]
    b = beta.unsqueeze(2)
    type2 = b * anchors.unsqueeze(1) + (1 - b) * pool[partner]
    features = F.normalize(torch.cat([type1, type2], dim=1), dim=2)
    return Mixed(features, hard, pairs, alpha, partner, beta)


class HardNegativeMixer:
    """The piece an objective holds: decides when to mix and turns mixed points into logits."""

    def __init__(self, cfg: MochiConfig):
        check_mochi(cfg)
        self.n, self.s, self.s_prime = int(cfg.n), int(cfg.s), int(cfg.s_prime)
        self.start_epoch = float(cfg.start_epoch)

    @property
    def enabled(self) -> bool:
        return self.s + self.s_prime > 0

    def active(self, epoch: float) -> bool:
        """Mixing this step? ``epoch`` is the batch's epoch (``batch["epoch"]`` from the trainer)."""
        return self.enabled and epoch >= self.start_epoch

    def extra_similarities(self, anchors: torch.Tensor, pool: torch.Tensor, sim: torch.Tensor,
                           generator: torch.Generator | None):
        """``(extra, mixed)``: (M, s + s′) similarities anchors·h, differentiable in the anchors
        only, to pass as ``extra`` to :func:`selfsup.losses.contrastive_logits_loss`."""
        mixed = mix_hard_negatives(anchors, pool, sim, self.n, self.s, self.s_prime, generator)
        extra = torch.einsum("md,mkd->mk", anchors, mixed.features)
        return extra, mixed


def monitor_has_labels(cfg) -> bool:
    """Whether the run's online monitor is on and reads labelled shards: only then do objectives
    track labels for :func:`same_class_share` (labels never reach a loss)."""
    mc = cfg.monitor
    return bool(mc.every_steps) and bool(mc.val or cfg.data.val)


def same_class_share(hard: torch.Tensor, anchor_labels: torch.Tensor,
                     pool_labels: torch.Tensor) -> torch.Tensor:
    """Share of the anchors' hardest negatives (``hard``, (M, N) pool indices) that have the
    anchor's class, over the pairs whose two labels are known (-1: unknown); NaN when none is.
    A diagnostic, not part of the loss: a same-class "negative" is a false negative, and mixing
    from many of them pushes the anchor away from its own class (docs/methods.md §2.3). One
    gather of M·N labels, no host sync."""
    pool = pool_labels[hard]
    anchor = anchor_labels.unsqueeze(1)
    known = (pool >= 0) & (anchor >= 0)
    return ((pool == anchor) & known).sum().float() / known.sum().float()
