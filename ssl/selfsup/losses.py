"""One contrastive loss at the level of similarities, shared by every contrastive objective.

lightly's losses take two embedding batches and build the logits themselves, so nothing can be
added to one anchor's denominator. MoCHi (hard negatives mixed per anchor) and the Hallucinator
(extra positives whose same-instance entries must be masked) both need exactly that, so the
objectives that support them build per-anchor similarities and call
:func:`contrastive_logits_loss` over ``[positive | negatives | extra negatives]``:

* ``pos``   (M,)    cosine similarity of each anchor with its positive;
* ``neg``   (M, K)  cosine similarities with the negatives; ``-inf`` marks an entry that is not a
  negative of that anchor (itself, its positive, another view of the same image);
* ``extra`` (M, E)  per-anchor extra negatives (MoCHi's synthetic points), or None.

InfoNCE keeps the positive in the denominator, DCL/DCLW drop it (docs/methods.md §1), DCLW weights the
positive term by ``2 − M·softmax(pos/σ)`` (detached, as lightly). The weight is invariant to
listing every pair twice (SimCLR's two directions), so it equals lightly's N-pair weight. The
loss is the mean over the M anchors, as lightly's losses are.

:func:`pair_similarities` turns SimCLR-style pairs into that form, with negatives gathered from
every process through lightly's autograd-aware gather (the same gather lightly's own losses use,
so the DDP gradient equals the single-process gradient of the global batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.utils import dist

from selfsup.errors import RecipeError

LOSSES = ("infonce", "dcl", "dclw")


def vmf_weights(pos: torch.Tensor, sigma: float) -> torch.Tensor:
    """DCLW's weights ``2 − exp(pos/σ) / mean(exp(pos/σ))`` over the anchors (detached)."""
    pos = pos.detach()
    return 2 - pos.numel() * torch.softmax(pos / sigma, dim=0)


def contrastive_logits_loss(pos: torch.Tensor, neg: torch.Tensor, extra: torch.Tensor | None = None,
                            loss: str = "infonce", temperature: float = 0.1,
                            sigma: float = 0.5) -> torch.Tensor:
    """InfoNCE / DCL / DCLW of M anchors from their similarities (see the module docstring).

    ``-pos/τ·w + logsumexp([pos?, neg, extra]/τ)``, averaged over the anchors; ``w`` is 1 except
    for DCLW and the positive is in the logsumexp only for InfoNCE.
    """
    if loss not in LOSSES:
        raise RecipeError(f"objective.loss must be one of {', '.join(LOSSES)}, not {loss!r}")
    parts = [pos.unsqueeze(1)] if loss == "infonce" else []
    parts.append(neg)
    if extra is not None:
        parts.append(extra)
    denominator = torch.logsumexp(torch.cat(parts, dim=1) / temperature, dim=1)
    numerator = pos / temperature
    if loss == "dclw":
        numerator = numerator * vmf_weights(pos, sigma)
    return (denominator - numerator).mean()


def gather_cat(x: torch.Tensor, grad: bool = True) -> torch.Tensor:
    """Rows of ``x`` from every process, in rank order (autograd-aware unless ``grad=False``)."""
    if dist.world_size() == 1:
        return x
    if grad:
        return torch.cat(dist.gather(x), dim=0)
    out = [torch.empty_like(x) for _ in range(dist.world_size())]
    torch.distributed.all_gather(out, x.detach().contiguous())
    return torch.cat(out, dim=0)


def pair_similarities(z0: torch.Tensor, z1: torch.Tensor, instance: torch.Tensor | None = None,
                      gather_distributed: bool = True):
    """SimCLR-style anchors from P pairs ``(z0[i], z1[i])``, both directions.

    Returns ``(anchors, pos, neg, pool)``: the 2P L2-normalised local anchors ``[z0; z1]``, their
    positive similarities, their similarities with the pool ``[z0; z1]`` of every process
    (2P·world columns, ``-inf`` where the pool entry shares the anchor's ``instance`` id), and the
    normalised pool. ``instance`` (P,) defaults to ``arange(P)`` (each pair its own image), which
    masks exactly the anchor itself and its positive: plain SimCLR. The Hallucinator passes
    repeated ids so that an image's other copies are never its negatives.
    """
    p = z0.shape[0]
    z0, z1 = F.normalize(z0, dim=1), F.normalize(z1, dim=1)
    if instance is None:
        instance = torch.arange(p, device=z0.device)
    n_inst = p  # ids are < p: offsetting by rank·p keeps them unique across processes
    world = dist.world_size() if gather_distributed else 1
    if world > 1:
        g0, g1 = gather_cat(z0), gather_cat(z1)
        ginst = torch.cat([instance + r * n_inst for r in range(world)])
        local = instance + dist.rank() * n_inst
    else:
        g0, g1, ginst, local = z0, z1, instance, instance
    anchors = torch.cat([z0, z1])
    pool = torch.cat([g0, g1])
    pos = (z0 * z1).sum(1).repeat(2)
    same = torch.cat([local, local]).unsqueeze(1) == torch.cat([ginst, ginst]).unsqueeze(0)
    neg = (anchors @ pool.T).masked_fill(same, float("-inf"))
    return anchors, pos, neg, pool
