"""Retrieval metrics beside the k-NN: every val image queries the train gallery.

* ``recall@k`` (k = 1, 5, 10): the share of queries with at least one same-label gallery image
  among their k nearest (cosine on L2-normalised features, as the k-NN);
* ``map@r``: mean average precision at R (Musgrave, Belongie & Lim, "A Metric Learning Reality
  Check", ECCV 2020): for a query whose class has R images in the gallery,
  ``AP@R = (1/R) * sum_{i<=R} P(i) * rel(i)`` with ``P(i)`` the precision among the first i
  neighbours and ``rel(i)`` whether the i-th is of the query's class. R is capped at
  :data:`MAX_R` (= 1000): with the paper's uncapped R, a 6,000-image Fashion-MNIST class would need
  the top 6,000 of 60,000 per query, and the k-NN pass would sort six times further than it does.
  With the cap, ``map@r`` on large classes is the precision-weighted score of the first 1,000.

Why it looks like this: the numbers come from the k-NN's own neighbour search
(:func:`selfsup_io.knn.knn_classify` with ``on_chunk``): one similarity product per query chunk
serves the votes and these metrics, so retrieval costs a longer ``topk``, not a second pass.

Ties: ``topk`` orders equal similarities arbitrarily, and duplicate images (raw pixels; the same
photo twice) make exact ties common. Here equal similarities are ordered by gallery index, lower
first, including at the cut-off of the neighbour list (the search returns one neighbour more; when
it ties with the last one kept, that row is sorted whole), so the metrics do not depend on the
device or the chunking.
"""

from __future__ import annotations

import torch

MAX_R = 1000
RECALL_KS = (1, 5, 10)


def ordered(scores: torch.Tensor, sims: torch.Tensor, idx: torch.Tensor, k: int) -> torch.Tensor:
    """The first ``k`` of ``idx`` with equal similarities in gallery-index order, the cut-off made
    exact too. ``sims``/``idx``: a top list of more than ``k`` columns when the gallery has more
    than ``k`` images (the one after the cut says whether a tie crosses it)."""
    cut = sims[:, k] == sims[:, k - 1] if sims.shape[1] > k else None
    idx, sims = idx[:, :k], sims[:, :k]
    o = idx.argsort(dim=1)
    idx, sims = idx.gather(1, o), sims.gather(1, o)
    o = sims.argsort(dim=1, descending=True, stable=True)
    idx = idx.gather(1, o)
    if cut is not None:  # a tie reaches beyond the list: that row is sorted whole
        for r in cut.nonzero().flatten().tolist():
            idx[r] = scores[r].sort(descending=True, stable=True).indices[:k]
    return idx


class Retrieval:
    """Accumulates the metrics over the k-NN's query chunks (pass it as ``on_chunk``)."""

    def __init__(self, train_labels: torch.Tensor, query_labels: torch.Tensor, max_r: int = MAX_R):
        self.train_y = train_labels.long()
        self.query_y = query_labels.long()
        c = int(max(self.train_y.max(), self.query_y.max())) + 1
        self.counts = torch.bincount(self.train_y.cpu(), minlength=c)
        self.max_r = int(max_r)
        n = len(self.train_y)
        self.recall_ks = [k for k in RECALL_KS if k <= n]
        #: neighbours each query needs: the largest recall k and the largest (capped) R
        self.k = min(n, max(max(RECALL_KS), min(self.max_r, int(self.counts.max()))))
        #: what to ask the k-NN's search for: one more, to see whether a tie crosses the cut
        self.search_k = min(n, self.k + 1)
        self.hits = {k: 0 for k in self.recall_ks}
        self.ap_sum, self.n = 0.0, 0

    def __call__(self, start: int, scores: torch.Tensor, sims: torch.Tensor, idx: torch.Tensor) -> None:
        idx = ordered(scores, sims, idx, self.k)
        dev = idx.device
        y = self.query_y[start:start + len(idx)].to(dev)
        rel = self.train_y.to(dev)[idx] == y[:, None]
        for k in self.recall_ks:
            self.hits[k] += int(rel[:, :k].any(1).sum())
        r = self.counts.to(dev)[y].clamp(max=self.max_r)
        pos = torch.arange(1, idx.shape[1] + 1, device=dev)
        precision = rel.cumsum(1) / pos
        ap = (precision * rel * (pos[None] <= r[:, None])).sum(1) / r.clamp(min=1)
        self.ap_sum += float(ap[r > 0].sum())
        self.n += len(idx)

    def result(self) -> dict:
        """``{"recall@1", "recall@5", "recall@10", "map@r", "max_r"}`` (None where the gallery
        is smaller than k); a query class absent from the gallery scores 0 (R = 0)."""
        out = {f"recall@{k}": (self.hits[k] / self.n if k in self.hits and self.n else None)
               for k in RECALL_KS}
        out["map@r"] = self.ap_sum / self.n if self.n else None
        out["max_r"] = self.max_r
        return out
