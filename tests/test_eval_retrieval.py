"""Retrieval metrics (recall@k, mAP@R) against a slow loop written out here, with exact ties and a
class that has one gallery image; and that they ride on the k-NN's own pass."""

import torch
import torch.nn.functional as F

from selfsup_eval.retrieval import MAX_R, Retrieval
from selfsup_io.knn import knn_classify


def slow(train_x, train_y, query_x, query_y, max_r):
    """Per query: every gallery image ranked by cosine, ties by gallery index (lower first)."""
    sims = F.normalize(query_x.float(), dim=1) @ F.normalize(train_x.float(), dim=1).T
    recall = {1: 0, 5: 0, 10: 0}
    ap_total = 0.0
    for q in range(len(query_x)):
        ranking = sorted(range(len(train_x)), key=lambda j: (-float(sims[q, j]), j))
        same = [int(train_y[j]) == int(query_y[q]) for j in ranking]
        for k in recall:
            recall[k] += any(same[:k])
        r = min(sum(int(y) == int(query_y[q]) for y in train_y), max_r)
        hits, ap = 0, 0.0
        for i in range(r):  # AP@R = (1/R) sum_{i<=R} P(i) rel(i)
            if same[i]:
                hits += 1
                ap += hits / (i + 1)
        ap_total += ap / r if r else 0.0
    n = len(query_x)
    return {**{f"recall@{k}": v / n for k, v in recall.items()}, "map@r": ap_total / n}


def data(seed=0):
    """Integer vectors on a tiny grid: many gallery rows are exact duplicates of one another (and
    of queries), so similarities tie exactly, across classes too. Class 4 has one gallery image."""
    g = torch.Generator().manual_seed(seed)
    train_x = torch.randint(0, 3, (90, 3), generator=g).float() + 0.5
    train_y = torch.randint(0, 4, (90,), generator=g)
    train_x[17], train_y[17] = torch.tensor([9.0, 0.5, 0.5]), 4  # the single class-4 image
    query_x = torch.randint(0, 3, (40, 3), generator=g).float() + 0.5
    query_y = torch.randint(0, 4, (40,), generator=g)
    query_x[:3], query_y[:3] = torch.tensor([8.0, 1.5, 0.5]), 4
    return train_x, train_y, query_x, query_y


def run(train_x, train_y, query_x, query_y, max_r=MAX_R, chunk_size=7, ks=(3,)):
    acc = Retrieval(train_y, query_y, max_r=max_r)
    knn_classify(train_x, train_y, query_x, ks=ks, extra_k=acc.search_k, on_chunk=acc, chunk_size=chunk_size)
    return acc.result()


def test_metrics_equal_a_slow_loop_with_ties_and_a_single_image_class():
    train_x, train_y, query_x, query_y = data()
    sims = F.normalize(query_x, dim=1) @ F.normalize(train_x, dim=1).T
    assert (sims.unsqueeze(2) == sims.unsqueeze(1)).sum() > 3 * sims.numel()  # ties everywhere
    got = run(train_x, train_y, query_x, query_y)
    want = slow(train_x, train_y, query_x, query_y, MAX_R)
    for key, value in want.items():
        assert abs(got[key] - value) < 1e-6, (key, got[key], value)
    assert 0.05 < want["map@r"] < 0.95 and want["recall@1"] < want["recall@10"]  # not trivial
    # the class-4 queries find their single gallery image first: AP@1 = 1 for each of them
    alone = run(train_x, train_y, query_x[:3], query_y[:3])
    assert alone["map@r"] == 1.0 and alone["recall@1"] == 1.0


def test_cap_on_r_and_chunking_and_a_large_k_sweep():
    train_x, train_y, query_x, query_y = data(seed=1)
    for max_r in (1, 4, 15):
        got = run(train_x, train_y, query_x, query_y, max_r=max_r, chunk_size=5)
        want = slow(train_x, train_y, query_x, query_y, max_r)
        assert abs(got["map@r"] - want["map@r"]) < 1e-6 and got["max_r"] == max_r
    # the k-NN sweep reaching past R (a longer neighbour list) changes nothing
    a = run(train_x, train_y, query_x, query_y, ks=(80,), chunk_size=64)
    b = run(train_x, train_y, query_x, query_y, ks=(1,), chunk_size=3)
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-6 for k in a)


def test_small_gallery_leaves_recall_at_10_undefined():
    train_x, train_y, query_x, query_y = data()
    got = run(train_x[:6], train_y[:6], query_x, query_y.clamp(max=3), ks=(2,))
    assert got["recall@10"] is None and got["recall@5"] is not None
