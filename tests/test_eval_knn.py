"""selfsup_io.knn against an obviously-correct loop and against scikit-learn."""

import math

import numpy as np
import pytest
import torch

from selfsup_io.knn import knn_classify, topk_accuracy
from test_eval_fixtures import clustered


def loop_votes(xtr, ytr, q, k, temperature):
    """Per query: cosine to every train sample, the k largest, exp(s/T) votes per class."""
    qn = q / q.norm()
    sims = sorted(((float(qn @ (t / t.norm())), j) for j, t in enumerate(xtr)), reverse=True)
    votes = {}
    for s, j in sims[:k]:
        votes[int(ytr[j])] = votes.get(int(ytr[j]), 0.0) + math.exp(s / temperature)
    return votes


def test_knn_equals_a_brute_force_loop_and_scikit_learn():
    from sklearn.neighbors import KNeighborsClassifier

    xtr, ytr = clustered(240, d=12, c=6, seed=0, spread=0.9)
    xq, yq = clustered(50, d=12, c=6, seed=1, spread=0.9)
    ks, t = (1, 7, 25), 0.07
    ranked = knn_classify(xtr, ytr, xq, ks=ks, temperature=t, chunk_size=16)  # 4 chunks
    for k in ks:
        for i in range(len(xq)):
            votes = loop_votes(xtr, ytr, xq[i], k, t)
            best = sorted(votes, key=votes.get, reverse=True)
            assert int(ranked[k][i, 0]) == best[0]
            n = min(5, len(best))  # classes without votes have no defined order
            assert ranked[k][i, :n].tolist() == best[:n], (k, i)
        sk = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric="cosine",
                                  weights=lambda d: np.exp((1 - d) / t)).fit(xtr.numpy(), ytr.numpy())
        np.testing.assert_array_equal(ranked[k][:, 0].numpy(), sk.predict(xq.numpy()))
    top1 = topk_accuracy(ranked[25], yq, 1)
    assert 0.4 < top1 < 0.95  # neither trivial nor hopeless, so a wrong vote would show
    assert top1 <= topk_accuracy(ranked[25], yq, 5)


def test_one_pass_sweep_equals_separate_runs_and_chunking_does_not_matter():
    xtr, ytr = clustered(500, d=20, c=7, seed=2, spread=0.7)
    xq, _ = clustered(130, d=20, c=7, seed=3, spread=0.7)
    sweep = knn_classify(xtr, ytr, xq, ks=(200, 3, 40), chunk_size=1024)
    assert sorted(sweep) == [3, 40, 200]
    for k in (3, 40, 200):
        alone = knn_classify(xtr, ytr, xq, ks=(k,), chunk_size=17)[k]
        assert torch.equal(sweep[k][:, 0], alone[:, 0])
    assert not torch.equal(sweep[3][:, 0], sweep[200][:, 0])  # the ks do differ on this data


def test_small_temperature_is_stable_and_tends_to_nearest_neighbour():
    xtr, ytr = clustered(300, d=8, c=4, seed=4, spread=0.5)
    xq, _ = clustered(80, d=8, c=4, seed=5, spread=0.5)
    cold = knn_classify(xtr, ytr, xq, ks=(50,), temperature=1e-4)[50]  # exp(1/T) overflows fp32
    nearest = knn_classify(xtr, ytr, xq, ks=(1,))[1]
    assert torch.equal(cold[:, 0], nearest[:, 0])
    hot = knn_classify(xtr, ytr, xq, ks=(50,), temperature=100.0)[50]  # ≈ unweighted majority
    assert not torch.equal(hot[:, 0], nearest[:, 0])


def test_accuracy_helpers_count_exactly():
    ranked = torch.tensor([[2, 0, 1], [1, 2, 0], [0, 1, 2], [0, 2, 1]])
    labels = torch.tensor([2, 2, 1, 1])
    assert topk_accuracy(ranked, labels, 1) == 0.25
    assert topk_accuracy(ranked, labels, 2) == 0.75
    assert topk_accuracy(ranked, labels, 3) == 1.0
    xtr, ytr = clustered(100, d=6, c=3, seed=6)
    ranked = knn_classify(xtr, ytr, xtr, ks=(1, 5))
    assert topk_accuracy(ranked[1], ytr, 1) == 1.0  # every query is its own nearest neighbour
    assert topk_accuracy(ranked[5], ytr, 1) <= topk_accuracy(ranked[5], ytr, 5) == 1.0  # 3 classes


def test_k_larger_than_the_train_set_is_an_error():
    with pytest.raises(ValueError, match="larger than the train set"):
        knn_classify(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), torch.randn(2, 3), ks=(10,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_gives_the_cpu_predictions():
    xtr, ytr = clustered(400, d=32, c=5, seed=7, spread=0.8)
    xq, _ = clustered(100, d=32, c=5, seed=8, spread=0.8)
    cpu = knn_classify(xtr, ytr, xq, ks=(20,))[20]
    gpu = knn_classify(xtr.cuda(), ytr.cuda(), xq.cuda(), ks=(20,))[20]
    assert gpu.device.type == "cuda" and torch.equal(cpu[:, 0], gpu[:, 0].cpu())
