"""selfsup_eval.linear against scikit-learn and against autograd."""

import torch

from selfsup_eval.linear import WEIGHT_DECAYS, linear_probe, loss_and_grad, standardise
from test_eval_fixtures import clustered


def test_linear_probe_reaches_scikit_learn_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    xtr, ytr = clustered(2000, d=24, c=6, seed=2, spread=0.55)
    xva, yva = clustered(1000, d=24, c=6, seed=3, spread=0.55)
    ours = linear_probe(xtr, ytr, xva, yva)
    ztr, zva = standardise(xtr, xva)
    sk = LogisticRegression(max_iter=5000).fit(ztr.numpy(), ytr.numpy())
    sk_acc = float((sk.predict(zva.numpy()) == yva.numpy()).mean())
    assert 0.4 < sk_acc < 0.95  # a problem where a poor fit would show
    assert ours["top1"] >= sk_acc - 0.005, (ours, sk_acc)
    # the same objective as scikit-learn's with C = 1 / (N * wd): the same optimum
    same = LogisticRegression(C=1 / (len(xtr) * ours["wd"]), max_iter=5000, tol=1e-8)
    same.fit(ztr.numpy(), ytr.numpy())
    agree = float((same.predict(zva.numpy()) == ours_predictions(ztr, ytr, zva, ours["wd"])).mean())
    assert agree >= 0.995, agree
    assert ours["top1"] <= ours["top5"] and ours["wd"] in WEIGHT_DECAYS
    assert ours["lr"] is None and ours["optimizer"] == "lbfgs"
    assert "no augmentation" in ours["protocol"]
    assert ours["sweep"][f"{ours['wd']:g}"] == max(ours["sweep"].values())  # chosen on the hold-out


def ours_predictions(ztr, ytr, zva, wd):
    from selfsup_eval.linear import fit

    w, b = fit(ztr, ytr, int(ytr.max()) + 1, wd, max_iter=500)
    return (zva @ w.T + b).argmax(1).numpy()


def test_the_hand_written_gradient_is_autograds():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (50,), generator=g)
    w = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(x @ w.T + b, y) + 0.5 * 0.3 * (w * w).sum()
    ref.backward()
    loss, gw, gb = loss_and_grad(x, y, w.detach(), b.detach(), 0.3, block=16)  # 4 blocks
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gw, w.grad)
    torch.testing.assert_close(gb, b.grad)


def test_weight_decay_is_chosen_on_the_hold_out_and_matters():
    # few samples, many noisy dimensions: the penalty changes the held-out accuracy
    g = torch.Generator().manual_seed(1)
    xtr, ytr = clustered(200, d=60, c=3, seed=4, spread=0.35)
    xtr = torch.cat([xtr, torch.randn(200, 200, generator=g)], 1)
    xva, yva = clustered(400, d=60, c=3, seed=5, spread=0.35)
    xva = torch.cat([xva, torch.randn(400, 200, generator=g)], 1)
    r = linear_probe(xtr, ytr, xva, yva)
    assert len(set(r["sweep"].values())) > 1
    assert r["sweep"][f"{r['wd']:g}"] == max(r["sweep"].values())
    assert r == linear_probe(xtr, ytr, xva, yva)  # seeded hold-out: deterministic


def test_constant_features_do_not_blow_up_standardisation():
    xtr = torch.cat([torch.randn(100, 3), torch.zeros(100, 1)], 1)
    xva = torch.cat([torch.randn(10, 3), torch.ones(10, 1)], 1)
    ztr, zva = standardise(xtr, xva)
    assert torch.isfinite(zva).all() and zva[:, 3].eq(1).all() and ztr[:, 3].eq(0).all()
