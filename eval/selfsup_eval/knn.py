"""Weighted k-NN classification (InstDisc / DINO ``eval_knn.py``).

Cosine similarity between L2-normalised features; each of the k nearest training samples votes for
its class with weight exp(s / T). Every k of a sweep comes from one top-max(k) pass, and queries
are processed in chunks so that memory stays bounded by chunk × train size (dino #161 ran out of
memory by normalising and multiplying everything at once). Runs on whatever device the features
are on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor,
                 query_features: torch.Tensor, ks=(20,), temperature: float = 0.07,
                 num_classes: int | None = None, chunk_size: int = 1024, topn: int = 5):
    """Return ``{k: (Q, topn) long tensor}``: the classes ranked by vote, best first."""
    ks = sorted(set(int(k) for k in ks))
    if ks[-1] > len(train_features):
        raise ValueError(f"k={ks[-1]} is larger than the train set ({len(train_features)} samples)")
    train = F.normalize(train_features.float(), dim=1)
    labels = train_labels.to(train.device).long()
    c = int(num_classes or int(labels.max()) + 1)
    topn = min(topn, c)
    out = {k: [] for k in ks}
    for q in query_features.split(chunk_size):
        q = F.normalize(q.to(train.device).float(), dim=1)
        sims, idx = (q @ train.T).topk(ks[-1], dim=1)
        votes_w = (sims / temperature).exp()
        votes_c = labels[idx]
        for k in ks:
            scores = torch.zeros(len(q), c, device=q.device)
            scores.scatter_add_(1, votes_c[:, :k], votes_w[:, :k])
            out[k].append(scores.topk(topn, dim=1).indices)
    return {k: torch.cat(v) for k, v in out.items()}


def topk_accuracy(ranked: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    labels = labels.to(ranked.device).view(-1, 1)
    return (ranked[:, :k] == labels).any(1).float().mean().item()
