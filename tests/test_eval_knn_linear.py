"""k-NN ⊕ linear (nn-revisit): the interpolation against an independent computation, its limits
(λ = 0 is the probe, λ = 1 the k-NN), choices made on the train hold-out only, and the k-NN-weighted
probe loss against the formula written out."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from selfsup_io.knn import knn_classify
from selfsup_eval.knn_linear import (combine, knn_linear, knn_loss_weights, knn_probs, neighbours, tune)
from selfsup_eval.linear import fit_probe, loss_and_grad
from test_eval_fixtures import clustered


def slow_knn_probs(train_x, train_y, q, k, t, c, skip=None):
    """Per query: cosine to every train sample, the k best (skipping ``skip``), votes exp(s/T)."""
    tr = train_x.double().numpy()
    tr = tr / np.linalg.norm(tr, axis=1, keepdims=True)
    out = np.zeros((len(q), c))
    for i, x in enumerate(q.double().numpy()):
        s = tr @ (x / np.linalg.norm(x))
        order = [j for j in np.argsort(-s, kind="stable") if j != (skip[i] if skip is not None else -1)][:k]
        for j in order:
            out[i, int(train_y[j])] += math.exp(s[j] / t)
        out[i] /= out[i].sum()
    return out


def test_the_combination_equals_an_independent_computation():
    xtr, ytr = clustered(120, d=8, c=4, seed=0, spread=0.8)
    xq, _ = clustered(30, d=8, c=4, seed=1, spread=0.8)
    logits = torch.randn(30, 4, generator=torch.Generator().manual_seed(3))
    sims, idx = neighbours(xtr, xq, 7, chunk_size=8)
    for k, t, lam in ((7, 0.07, 0.3), (3, 0.5, 0.85), (1, 0.02, 0.05)):
        ours = combine(knn_probs(sims, idx, ytr, k, t, 4), logits.softmax(1), lam)
        lin = np.exp(logits.double().numpy())
        lin /= lin.sum(1, keepdims=True)
        ref = lam * slow_knn_probs(xtr, ytr, xq, k, t, 4) + (1 - lam) * lin
        np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def problem():
    xtr, ytr = clustered(400, d=12, c=5, seed=0, spread=0.45)
    xva, yva = clustered(200, d=12, c=5, seed=1, spread=0.45)
    return xtr, ytr, xva, yva


def test_lambda_0_is_the_probe_and_lambda_1_the_knn(problem):
    xtr, ytr, xva, yva = problem
    out = knn_linear(xtr, ytr, xva, yva, return_probs=True)
    rec, logits = out["knn_linear"], out["val_logits"]
    fit = fit_probe(xtr, ytr, xva, yva)  # the same probe fitted directly
    torch.testing.assert_close(logits, fit.val_logits)
    assert out["linear"]["top1"] == fit.record["top1"]
    sims, idx = neighbours(xtr, xva, rec["k"])
    pk = knn_probs(sims, idx, ytr, rec["k"], rec["temperature"], 5)
    assert torch.equal(combine(pk, logits.softmax(1), 0.0).argmax(1), logits.argmax(1))
    ranked = knn_classify(xtr, ytr, xva, ks=(rec["k"],), temperature=rec["temperature"])[rec["k"]]
    assert torch.equal(combine(pk, logits.softmax(1), 1.0).argmax(1), ranked[:, 0])
    # the reported figure is the combination at the reported (λ, k, T)
    p = combine(pk, logits.softmax(1), rec["lambda"])
    torch.testing.assert_close(p, out["val_probs"])
    assert rec["top1"] == pytest.approx((p.argmax(1) == yva).float().mean().item())
    assert 0.05 <= rec["lambda"] <= 0.95 and rec["tuned"] and rec["holdout_top1"] is not None


def test_choices_come_from_the_train_hold_out_never_from_val(problem):
    xtr, ytr, xva, yva = problem
    a = knn_linear(xtr, ytr, xva, yva)["knn_linear"]
    shuffled = yva[torch.randperm(len(yva), generator=torch.Generator().manual_seed(0))]
    b = knn_linear(xtr, ytr, xva, shuffled)["knn_linear"]
    assert (a["lambda"], a["k"], a["temperature"]) == (b["lambda"], b["k"], b["temperature"])
    assert a["top1"] != b["top1"]  # val labels only score
    # and the choice is the grid point with the best held-out accuracy, as computed here
    fit = fit_probe(xtr, ytr, xva, yva)
    keep = torch.ones(len(xtr), dtype=torch.bool)
    keep[fit.hold] = False
    best = tune(xtr[keep], ytr[keep], xtr[fit.hold], ytr[fit.hold], 5, fit.hold_logits.softmax(1))
    assert (best["lambda"], best["k"], best["temperature"]) == (a["lambda"], a["k"], a["temperature"])
    sims, idx = neighbours(xtr[keep], xtr[fit.hold], best["k"])
    pk = knn_probs(sims, idx, ytr[keep], best["k"], best["temperature"], 5)
    acc = (combine(pk, fit.hold_logits.softmax(1), best["lambda"]).argmax(1) == ytr[fit.hold]).float().mean()
    assert best["holdout_top1"] == pytest.approx(acc.item())
    for lam in (0.05, 0.5, 0.95):  # no other λ at this (k, T) does better on the hold-out
        other = (combine(pk, fit.hold_logits.softmax(1), lam).argmax(1) == ytr[fit.hold]).float().mean()
        assert other.item() <= best["holdout_top1"] + 1e-9


def test_the_knn_loss_weights_are_the_leave_one_out_formula():
    xtr, ytr = clustered(60, d=6, c=3, seed=4, spread=0.5)
    w = knn_loss_weights(xtr, ytr, 5, 0.1, 0.3, 3)
    p = slow_knn_probs(xtr, ytr, xtr, 5, 0.1, 3, skip=list(range(60)))  # never its own neighbour
    nll = np.minimum(-np.log(np.maximum(p[np.arange(60), ytr.numpy()], 1e-300)), 100.0)
    np.testing.assert_allclose(w.numpy(), 1 + 0.3 * nll, rtol=1e-4)
    assert w.min() >= 1 and w.max() > 1.5  # some hard images weigh more


def test_the_weighted_loss_and_its_gradient_are_the_written_out_formula():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 7, generator=g), torch.randint(0, 4, (50,), generator=g)
    weight = 1 + torch.rand(50, generator=g) * 3
    w = torch.randn(4, 7, generator=g, requires_grad=True)
    b = torch.randn(4, generator=g, requires_grad=True)
    ref = (F.cross_entropy(x @ w.T + b, y, reduction="none") * weight).sum() / 50 + 0.5 * 0.01 * (w * w).sum()
    ref.backward()
    loss, gw, gb = loss_and_grad(x, y, w.detach(), b.detach(), 0.01, block=16, sample_weight=weight)
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(gw, w.grad)
    torch.testing.assert_close(gb, b.grad)


def test_knn_loss_option_trains_a_different_probe_and_records_it(problem):
    xtr, ytr, xva, yva = problem
    plain = knn_linear(xtr, ytr, xva, yva, return_probs=True)
    weighted = knn_linear(xtr, ytr, xva, yva, knn_loss=0.5, return_probs=True)
    info = weighted["linear"]["knn_loss"]
    assert info["coeff"] == 0.5 and info["mean_weight"] > 1 and info["k"] >= 1
    assert not torch.allclose(plain["val_logits"], weighted["val_logits"])
    assert weighted["knn_linear"]["knn_loss"] == 0.5 and plain["knn_linear"]["knn_loss"] is None


def test_without_a_hold_out_the_defaults_are_used_and_said():
    xtr, ytr = clustered(5, d=6, c=5, seed=0)  # one image per class
    xva, yva = clustered(20, d=6, c=5, seed=1)
    rec = knn_linear(xtr, ytr, xva, yva, hold=torch.tensor([], dtype=torch.long))["knn_linear"]
    assert not rec["tuned"] and (rec["lambda"], rec["k"], rec["temperature"]) == (0.5, 5, 0.07)


def test_the_penalty_sweep_never_sees_a_held_out_label(problem, monkeypatch):
    """The sweep fits' k-NN weights come from the rest of train alone: with k and T fixed (their
    choice on the hold-out is a legitimate use of it), relabelling the held-out images leaves those
    weights unchanged, and they are the leave-one-out formula within the rest."""
    import selfsup_eval.knn_linear as kl
    xtr, ytr, xva, yva = problem
    seen = []

    def spy(*a, **kw):
        seen.append((kw["sample_weight"].clone(), kw["sweep_weight"].clone()))
        return fit_probe(*a, **kw)

    def fixed_signal(*a, p_linear=None, **kw):  # the k-NN signal's k and T; λ is still tuned
        return {"k": 6, "temperature": 0.1} if p_linear is None else tune(*a, p_linear=p_linear, **kw)

    monkeypatch.setattr(kl, "fit_probe", spy)
    monkeypatch.setattr(kl, "tune", fixed_signal)
    hold = torch.arange(0, len(xtr), 7)
    rest = torch.tensor([i for i in range(len(xtr)) if i % 7])
    relabelled = ytr.clone()
    relabelled[hold] = (ytr[hold] + 1) % int(ytr.max() + 1)
    rec = knn_linear(xtr, ytr, xva, yva, knn_loss=0.5, hold=hold)["linear"]["knn_loss"]
    knn_linear(xtr, relabelled, xva, yva, knn_loss=0.5, hold=hold)
    (full_a, sweep_a), (full_b, sweep_b) = seen
    torch.testing.assert_close(sweep_a[rest], sweep_b[rest])
    assert not torch.allclose(full_a[rest], full_b[rest])  # the final fit does use every label
    ref = knn_loss_weights(xtr[rest], ytr[rest], rec["k"], rec["temperature"], 0.5, int(ytr.max() + 1))
    torch.testing.assert_close(sweep_a[rest], ref)


def test_fit_probe_sweeps_with_the_sweep_weights(problem):
    """The penalty sweep (and the held-out logits k-NN ⊕ linear tunes λ on) use ``sweep_weight``
    where given: the same as a probe whose only weights they are."""
    xtr, ytr, xva, yva = problem
    g = torch.Generator().manual_seed(5)
    a, b = 1 + 3 * torch.rand(len(xtr), generator=g), 1 + 3 * torch.rand(len(xtr), generator=g)
    hold = torch.arange(0, len(xtr), 5)
    split = fit_probe(xtr, ytr, xva, yva, hold=hold, sample_weight=b, sweep_weight=a)
    only_a = fit_probe(xtr, ytr, xva, yva, hold=hold, sample_weight=a)
    only_b = fit_probe(xtr, ytr, xva, yva, hold=hold, sample_weight=b)
    torch.testing.assert_close(split.hold_logits, only_a.hold_logits)
    assert not torch.allclose(split.hold_logits, only_b.hold_logits)
