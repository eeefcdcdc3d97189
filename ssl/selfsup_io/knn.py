"""Weighted k-NN classification (InstDisc; DINO ``eval_knn.py``), import-light: torch only.

Protocol: features are L2-normalised, similarity is the cosine ``s``; each of the k nearest
training samples votes for its class with weight ``exp(s / T)`` (T = 0.07 by default); classes
are ranked by their summed votes. The trainer's online monitor calls :func:`knn_classify` too,
so the monitor's and ``selfsup-eval``'s numbers come from the same code: that is why it lives in
``selfsup_io``, which both packages import and which imports neither.

Why it looks the way it does:

* every k of a sweep comes from ONE top-max(k) pass (``topk`` returns neighbours sorted, so the
  k nearest are the first k columns), so ``--k 10 20 100 200`` costs one similarity pass;
* queries go in chunks of ``chunk_size``, so memory is bounded by chunk × train, never by
  queries × train (dino #161 ran out of memory by multiplying everything at once);
* it runs on the device the training features are on (the GPU when the CLI has one);
* the similarity is one fp32 matrix product per chunk followed by one ``topk``: on a CPU this
  is the whole cost (the product runs near the machine's fp32 peak). A bf16 shortlist with exact
  fp32 re-scoring was tried and dropped: on a 2-core AVX512-BF16 CPU the candidate gather and the
  fall-backs ate the gain of the faster product (bench/RESULTS.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsup_io.errors import UserError


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor,
                 query_features: torch.Tensor, ks=(20,), temperature: float = 0.07,
                 num_classes: int | None = None, chunk_size: int = 1024,
                 topn: int = 5, extra_k: int = 0, on_chunk=None) -> dict[int, torch.Tensor]:
    """Weighted k-NN predictions for every k in ``ks`` from one neighbour search.

    Returns ``{k: LongTensor (Q, min(topn, C))}``: per query the classes ranked by summed vote
    ``exp(s/T)``, best first (column 0 is the prediction; top-5 accuracy reads 5 columns).
    Computed on ``train_features.device`` (move the features to the GPU to run it there).
    Raises ``ValueError`` if a k exceeds the number of training samples.

    ``on_chunk(start, scores, sims, idx)``, when given, sees every query chunk's full similarity
    matrix and its top-``max(max(ks), extra_k)`` neighbours (``extra_k`` capped at the train
    size): retrieval metrics (:mod:`selfsup_eval.retrieval`) ride on this same pass.
    """
    ks = sorted({int(k) for k in ks})
    n = len(train_features)
    if not ks or ks[0] < 1:
        raise UserError(f"k must be at least 1, got {ks}")
    if ks[-1] > n:
        raise UserError(f"k={ks[-1]} is larger than the train set ({n} samples)")
    if temperature <= 0:
        raise UserError(f"temperature must be positive, got {temperature}")
    device = train_features.device
    train = F.normalize(train_features.float(), dim=1)
    labels = train_labels.to(device).long()
    c = int(num_classes) if num_classes else int(labels.max()) + 1
    kmax, topn = max(ks[-1], min(int(extra_k), n)), min(topn, c)
    out = {k: [] for k in ks}
    for start, q in zip(range(0, len(query_features), chunk_size), query_features.split(chunk_size)):
        q = F.normalize(q.to(device).float(), dim=1)
        scores = q @ train.T
        sims, idx = scores.topk(kmax, dim=1)  # sorted: the k nearest are the first k
        if on_chunk is not None:
            on_chunk(start, scores, sims, idx)
        del scores
        # exp(s/T) up to a per-query factor exp(s_max/T), which does not change the ranking
        # but keeps a small T from overflowing fp32
        weights = ((sims - sims[:, :1]) / temperature).exp()
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
