"""The Hallucinator (Wu, Hobbs, Hovakimyan, ICCV 2023): extra positives made in projection space,
as a piece any contrastive objective switches on from its recipe (``objective.hallucinator.*``;
docs/methods.md §5).

For a query projection q and its positive key k (the other view of the same image):

    ĥ = (1 + λ)·q − λ·k,   λ ~ U(0, λmax), one λ per step (the official ``random.uniform``)
    h = MLP([q ; ĥ])        Linear(2d, H)–ReLU–Linear(H, H)–ReLU–Linear(H, d), H = 2d by default

ĥ extrapolates q *away* from its key (a harder positive), the MLP smooths it; h is a new query
whose positive is the same k. The objective then contrasts queries ``[q; h]`` with keys
``[k; k]``. The MLP is an ordinary sub-module of the objective, so the optimizer trains it with the
same contrastive loss (there is no separate loss). As in the official code the generator works on
raw projections (MoCo: raw q, normalised k; SimCLR: both raw, k not detached); the loss normalises
afterwards. λ comes from the ``generator`` the trainer passes to ``forward`` (checkpointed), so it
is drawn per process per step; with ``λmax = 0`` (or λ = 0) ĥ = q exactly.

Variants (the official code's quirks, docs/methods.md §5.2; each switchable from the recipe):

* **SimCLR: the published loss is the default** (``mask_same_image: false``). The official code
  computes plain NT-Xent over queries ``[q; h]`` against keys ``[k; k]``, masking only each row
  itself, so q_i sees h_i and the second copy of k_i as *negatives* (and each k_i its own
  duplicate). ``mask_same_image: true`` is selfsup's earlier variant: every row carries its
  image's id and all entries of the same image leave the negatives, keeping only the designated
  positive (``selfsup.losses.pair_similarities``; docs/methods.md §5.5.4).
* **MoCo: the published queue is the default** (``enqueue_twice: true``). The official code
  enqueues the duplicated 2B keys [k; k], which repeats every negative in the queue (half as many
  distinct negatives for the same K) and fills it twice as fast. ``enqueue_twice: false`` is
  selfsup's earlier variant: B keys, the queue exactly as in plain MoCo, so switching the
  Hallucinator on changes only the positives (bench/RESULTS.md compares the two).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from selfsup.schema import at_least, key


@dataclass
class HallucinatorConfig:
    """``objective.hallucinator``: shared by every objective that supports it."""

    enabled: bool = key(False, "the Hallucinator's extra positives")
    lambda_max: float = key(0.1, "λ ~ U(0, lambda_max) per step", check=at_least(0))
    hidden_dim: Optional[int] = key(None, "generator width (null: 2 × the projection dim, official)",
                                    check=at_least(1, optional=True))
    mask_same_image: bool = key(False, "SimCLR: `false` is the published NT-Xent over [q; h] vs [k; k] (an "
                                "image's other rows are negatives); `true` masks them (a departure)")
    enqueue_twice: bool = key(True, "MoCo: `true` enqueues the duplicated keys [k; k] as the authors' code; "
                              "`false` each key once (a departure, the queue of plain MoCo)")


def extrapolate(q: torch.Tensor, k: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """ĥ = (1 + λ)·q − λ·k: q moved away from its positive key."""
    return (1 + lam) * q - lam * k


class Hallucinator(nn.Module):
    def __init__(self, dim: int, hidden_dim: int | None = None, lambda_max: float = 0.1):
        super().__init__()
        hidden = hidden_dim or 2 * dim
        self.lambda_max = float(lambda_max)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, dim))

    @classmethod
    def from_config(cls, cfg: HallucinatorConfig, dim: int) -> "Hallucinator":
        return cls(dim, cfg.hidden_dim, cfg.lambda_max)

    def draw_lambda(self, generator: torch.Generator | None) -> float:
        return float(torch.rand((), generator=generator, dtype=torch.float64)) * self.lambda_max

    def forward(self, q: torch.Tensor, k: torch.Tensor, generator: torch.Generator | None = None,
                lam: float | None = None):
        """``(h, λ)``: one hallucinated query per row of q (same shape), for the key k."""
        lam = self.draw_lambda(generator) if lam is None else float(lam)
        h_hat = extrapolate(q, k.to(q.dtype), lam)
        return self.mlp(torch.cat([q, h_hat], dim=1)), lam
