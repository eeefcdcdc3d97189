"""Weighted k-NN classification (InstDisc; DINO ``eval_knn.py``), import-light: torch only.

Protocol: features are L2-normalised, similarity is the cosine ``s``; each of the k nearest
training samples votes for its class with weight ``exp(s / T)`` (T = 0.07 by default); classes
are ranked by their summed votes. The trainer's online monitor calls :func:`knn_classify` too,
so the monitor's and ``selfsup-eval``'s numbers come from the same code.

Why it looks the way it does:

* every k of a sweep comes from ONE top-max(k) pass (``topk`` returns neighbours sorted, so the
  k nearest are the first k columns), so ``--k 10 20 100 200`` costs one similarity pass;
* queries go in chunks of ``chunk_size``, so memory is bounded by chunk × train, never by
  queries × train (dino #161 ran out of memory by multiplying everything at once);
* it runs on the device the training features are on (the GPU when the CLI has one);
* on CPUs with native bf16 matrix units (``prefilter="auto"``) the full similarity matrix is
  computed in bf16 (about twice as fast as fp32 there) only to shortlist ``m`` candidates per
  query; the candidates are re-scored in fp32 and the result is *provably* the fp32 top-k: the
  k-th fp32 score must beat the shortlist's worst bf16 score by more than a rigorous bound on the
  bf16 rounding error (:func:`bf16_error_bound`); rows where it does not are recomputed in full
  fp32. So ``prefilter`` changes the speed, never the answer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bf16_error_bound(dim: int) -> float:
    """Upper bound on |bf16 score - exact cosine| for unit vectors of ``dim`` dimensions.

    bf16 rounds to 8 significant bits (unit roundoff u = 2^-8): the inputs' rounding changes
    sum(q_i t_i) by at most (2u + u^2) * sum|q_i t_i| <= (2u + u^2) (Cauchy-Schwarz, unit
    norms); the fp32 accumulation adds at most dim * 2^-24 * (1 + u)^2; rounding the output to
    bf16 adds u * |s| <= u * (1 + 3u). A further 2 * dim * 2^-24 covers the fp32 rescoring and
    the fp32 reference it must agree with, and 1e-6 the normalisation of the inputs.
    """
    u, e32 = 2.0 ** -8, 2.0 ** -24
    return (2 * u + u * u) + dim * e32 * (1 + u) ** 2 + u * (1 + 3 * u) + 2 * dim * e32 + 1e-6


def _fast_bf16(device: torch.device) -> bool:
    if device.type != "cpu":
        return False  # GPUs are fast enough in fp32 and keep the code path simplest
    try:  # native bf16 dot products (AVX512-BF16 or AMX); emulated bf16 is slower than fp32
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def _exact(train: torch.Tensor, q: torch.Tensor, kmax: int):
    return (q @ train.T).topk(kmax, dim=1)


def _shortlisted(train: torch.Tensor, train16: torch.Tensor, q: torch.Tensor, kmax: int, m: int,
                 eps: float):
    """fp32 top-kmax via a bf16 shortlist of m candidates; also returns how many rows fell back."""
    approx, cand = (q.to(torch.bfloat16) @ train16.T).topk(m, dim=1, sorted=False)
    exact = torch.bmm(train[cand], q.unsqueeze(2)).squeeze(2)  # (Q, m) fp32 scores
    sims, pos = exact.topk(kmax, dim=1)
    idx = cand.gather(1, pos)
    # a non-candidate j has bf16 score <= the shortlist's worst, so fp32 score <= worst + eps
    bad = (sims[:, -1] <= approx.float().min(1).values + eps).nonzero().squeeze(1)
    if len(bad):
        sims[bad], idx[bad] = _exact(train, q[bad], kmax)
    return sims, idx, len(bad)


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor,
                 query_features: torch.Tensor, ks=(20,), temperature: float = 0.07,
                 num_classes: int | None = None, chunk_size: int = 1024, topn: int = 5,
                 prefilter: str | None = "auto") -> dict[int, torch.Tensor]:
    """Weighted k-NN predictions for every k in ``ks`` from one neighbour search.

    Returns ``{k: LongTensor (Q, min(topn, C))}``: per query the classes ranked by summed vote
    ``exp(s/T)``, best first (column 0 is the prediction; top-5 accuracy reads 5 columns).
    Computed on ``train_features.device``. ``prefilter``: "auto" (bf16 shortlist on CPUs with
    native bf16, exact result either way), "bf16" (force it), None (plain fp32).
    Raises ``ValueError`` if a k exceeds the number of training samples.
    """
    ks = sorted({int(k) for k in ks})
    n = len(train_features)
    if not ks or ks[0] < 1:
        raise ValueError(f"k must be at least 1, got {ks}")
    if ks[-1] > n:
        raise ValueError(f"k={ks[-1]} is larger than the train set ({n} samples)")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    device = train_features.device
    train = F.normalize(train_features.float(), dim=1)
    labels = train_labels.to(device).long()
    c = int(num_classes) if num_classes else int(labels.max()) + 1
    kmax, topn = ks[-1], min(topn, c)
    dim = train.shape[1]
    m = min(n, max(2 * kmax, kmax + 64))
    use16 = m < n and (prefilter == "bf16" or (prefilter == "auto" and _fast_bf16(device)))
    train16 = train.to(torch.bfloat16) if use16 else None
    eps = bf16_error_bound(dim)
    out = {k: [] for k in ks}
    fallbacks = seen = 0
    for q in query_features.split(chunk_size):
        q = F.normalize(q.to(device).float(), dim=1)
        if use16:
            sims, idx, bad = _shortlisted(train, train16, q, kmax, m, eps)
            fallbacks, seen = fallbacks + bad, seen + len(q)
            if seen >= 2 * chunk_size and fallbacks > seen // 2:
                use16 = False  # near-duplicate neighbourhoods: the shortlist rarely suffices
        else:
            sims, idx = _exact(train, q, kmax)
        weights = (sims / temperature).exp()
        votes = labels[idx]
        for k in ks:
            scores = torch.zeros(len(q), c, device=device)
            scores.scatter_add_(1, votes[:, :k], weights[:, :k])
            out[k].append(scores.topk(topn, dim=1).indices)
    return {k: torch.cat(v) for k, v in out.items()}


def topk_accuracy(ranked: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Fraction of queries whose label is among the first ``k`` ranked classes."""
    labels = labels.to(ranked.device).view(-1, 1)
    return (ranked[:, :k] == labels).any(1).float().mean().item()


def knn_accuracy(train_features, train_labels, query_features, query_labels, ks=(20,),
                 temperature: float = 0.07, **kw) -> dict[int, dict[str, float]]:
    """``{k: {"top1": .., "top5": ..}}``: :func:`knn_classify` plus :func:`topk_accuracy`."""
    ranked = knn_classify(train_features, train_labels, query_features, ks, temperature, **kw)
    return {k: {"top1": topk_accuracy(r, query_labels, 1), "top5": topk_accuracy(r, query_labels, 5)}
            for k, r in ranked.items()}
