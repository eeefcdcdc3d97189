"""Linear probe on cached features: the cached-feature protocol (no augmentation).

Protocol: multinomial logistic regression (a linear layer + softmax cross-entropy, bias
unpenalised, L2 penalty ``wd/2 * ||W||^2`` on the mean loss) on features standardised with the
train split's mean and std. The penalty is chosen on a seeded held-out 10% of the train split,
then the probe is refit on the whole train split with it, and top-1/top-5 are reported on val.

Why not the papers' probe: the classic protocol trains a linear layer for 90-100 epochs of SGD
with augmentation, pushing every image through the frozen backbone every epoch: hours per
checkpoint. On cached features the problem is a small, smooth, strongly convex one (60k x 512 x 10
is a few hundred MFLOP per pass), so full-batch L-BFGS (strong-Wolfe line search) solves it to
convergence in seconds on a CPU. That ranks checkpoints the same way but its numbers are not the
papers' numbers (no augmentation), which is why the output says "cached-feature protocol".

L-BFGS has no learning rate to tune (the line search sets every step), so the "lr x wd" sweep of
SGD probes reduces to a weight-decay sweep; the records carry ``lr: None`` and
``optimizer: "lbfgs"``. To keep the sweep cheap it fits at most ``sweep_samples`` (10k) of the
non-held-out train samples, with the penalty carried over as scikit-learn's ``C`` (the weight of
the *summed* loss, i.e. a fixed Gaussian prior on W), which is what transfers between training-set
sizes: ``wd`` on n samples is ``wd_full * N / n``. The sweep runs from the strongest penalty to
the weakest, each fit warm-started from the previous one; the final fit on all N train samples
starts from the chosen point's solution.

Loss and gradient are computed by hand, in row blocks (no autograd): autograd's ``x.T @ grad``
for a 60k x 512 input is several times slower on a CPU than ``grad.T @ x``, and blocks keep the
(N, classes) logits of a large split out of memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfsup_io.errors import UserError

WEIGHT_DECAYS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
PROTOCOL = "cached-feature protocol (no augmentation): L-BFGS logistic regression on standardised features"


def standardise(train_x: torch.Tensor, *others: torch.Tensor):
    """(train, *others) scaled by the train mean/std; constant train features stay centred only
    (dividing by ~0 would blow up any val sample where they are not constant)."""
    mean, std = train_x.mean(0), train_x.std(0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return [(x - mean) / std for x in (train_x, *others)]


def loss_and_grad(x, y, w, b, weight_decay: float, block: int = 16384, sample_weight=None):
    """Mean cross-entropy + wd/2 ||W||^2 of logits ``x @ W.T + b`` and its gradient (W: (C, D)).

    ``sample_weight`` (N,) multiplies each sample's cross-entropy; the sum is still divided by N
    (nn-revisit's k-NN-weighted loss, :mod:`selfsup_eval.knn_linear`)."""
    n = len(x)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    gw, gb = torch.zeros_like(w), torch.zeros_like(b)
    for start in range(0, n, block):
        xb, yb = x[start:start + block], y[start:start + block, None]
        z = torch.addmm(b, xb, w.T)
        lse = torch.logsumexp(z, 1, keepdim=True)
        ce = lse - z.gather(1, yb)
        p = torch.exp_(z - lse)  # softmax
        p.scatter_add_(1, yb, torch.full(yb.shape, -1.0, dtype=p.dtype, device=x.device))  # - one-hot
        if sample_weight is not None:
            sw = sample_weight[start:start + block, None]
            ce, p = ce * sw, p.mul_(sw)
        total += ce.sum(dtype=torch.float64)
        gw.addmm_(p.T, xb)
        gb += p.sum(0)
    loss = (total / n).to(w.dtype) + 0.5 * weight_decay * (w * w).sum()
    return loss, gw.div_(n).add_(w, alpha=weight_decay), gb.div_(n)


def fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, init=None,
        max_iter: int = 200, sample_weight=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS; returns (W (C, D), b (C,))."""
    if init is None:
        w = torch.zeros(num_classes, x.shape[1], device=x.device)
        b = torch.zeros(num_classes, device=x.device)
    else:
        w, b = (t.detach().clone() for t in init)
    # a longer history converges faster; bounded so that it stays under ~256 MB for big heads
    history = int(min(50, max(10, 2 ** 28 // (8 * w.numel() * w.element_size()))))
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=history, tolerance_grad=1e-7,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        loss, w.grad, b.grad = loss_and_grad(x, y, w, b, weight_decay, sample_weight=sample_weight)
        return loss

    with torch.no_grad():
        opt.step(closure)
    return w, b


def accuracy(logits: torch.Tensor, y: torch.Tensor, k: int = 1) -> float:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == y.view(-1, 1)).any(1).float().mean().item()


@dataclass
class ProbeFit:
    """A fitted probe and what k-NN ⊕ linear needs from it: the held-out split it chose its
    penalty on, the held-out logits of the sweep fit at that penalty (fitted without the held-out
    images) and the val logits of the final fit on all of train."""

    record: dict
    val_logits: torch.Tensor
    hold: torch.Tensor  # indices into train of the held-out part
    rest: torch.Tensor  # the other train indices
    hold_logits: torch.Tensor | None  # (len(hold), C); None when nothing was held out


def default_holdout(n: int, holdout: float = 0.1, seed: int = 0) -> torch.Tensor:
    """The seeded random hold-out the full-label probe has always used (at least one sample)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:min(n - 1, max(1, round(holdout * n)))]


def fit_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
              weight_decays=WEIGHT_DECAYS, holdout: float = 0.1, seed: int = 0, device="cpu",
              max_iter: int = 200, sweep_iter: int = 60, sweep_samples: int = 10000,
              hold: torch.Tensor | None = None, sample_weight: torch.Tensor | None = None,
              sweep_weight: torch.Tensor | None = None, num_classes: int | None = None) -> ProbeFit:
    """The probe (see :func:`linear_probe`), keeping its held-out split and logits.

    ``hold``: train indices to hold out (default: a seeded random ``holdout`` share, at least one
    sample, as the full-label probe has always done); an empty ``hold``
    skips the sweep and takes the strongest penalty (with nothing to compare, every penalty ties,
    and ties go to the stronger one). ``sample_weight`` (N,): per-sample loss weights of the final
    fit; ``sweep_weight`` (N, read at the non-held-out indices only): those of the sweep fits,
    when the weights themselves were computed from train labels and must not have seen the
    held-out ones (default: ``sample_weight``)."""
    train_x, val_x = train_x.float().to(device), val_x.float().to(device)
    train_y, val_y = train_y.long().to(device), val_y.long().to(device)
    n = len(train_x)
    if n < 2:
        raise UserError(f"the linear probe needs at least 2 train samples, got {n}")
    c = num_classes or int(max(train_y.max(), val_y.max())) + 1
    train_x, val_x = standardise(train_x, val_x)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    hold = default_holdout(n, holdout, seed) if hold is None else hold.long().cpu()
    keep = torch.ones(n, dtype=torch.bool)
    keep[hold] = False
    rest_all = perm[keep[perm]]  # in the seeded order, so the sweep's first 10k are a random subset
    hold, rest = hold.to(device), rest_all[:sweep_samples].to(device)
    sw = None if sample_weight is None else sample_weight.float().to(device)
    sweep_sw = sw if sweep_weight is None else sweep_weight.float().to(device)
    sweep, solutions, init = {}, {}, None
    if len(hold):
        x_rest, y_rest, x_hold, y_hold = train_x[rest], train_y[rest], train_x[hold], train_y[hold]
        scale = n / len(rest)  # same C (summed-loss weight) on the sweep subset as on all of train
        for wd in sorted(weight_decays, reverse=True):  # strong → weak, warm-started path
            init = fit(x_rest, y_rest, c, wd * scale, init, max_iter=sweep_iter,
                       sample_weight=None if sweep_sw is None else sweep_sw[rest])
            solutions[wd] = init
            sweep[wd] = accuracy(torch.addmm(init[1], x_hold, init[0].T), y_hold, 1)
        best = max(sweep, key=lambda wd: (sweep[wd], wd))  # ties → the stronger penalty
    else:
        best = max(weight_decays)
    w, b = fit(train_x, train_y, c, best, solutions.get(best), max_iter=max_iter, sample_weight=sw)
    logits = torch.addmm(b, val_x, w.T)
    hold_logits = None
    if len(hold):
        w0, b0 = solutions[best]
        hold_logits = torch.addmm(b0, train_x[hold], w0.T)
    record = {"top1": accuracy(logits, val_y, 1), "top5": accuracy(logits, val_y, 5), "lr": None,
              "wd": best, "optimizer": "lbfgs", "holdout_top1": sweep.get(best),
              "sweep": {f"{wd:g}": acc for wd, acc in sweep.items()}, "protocol": PROTOCOL}
    return ProbeFit(record, logits, hold, rest_all.to(device), hold_logits)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor,
                 val_y: torch.Tensor, weight_decays=WEIGHT_DECAYS, holdout: float = 0.1,
                 seed: int = 0, device="cpu", max_iter: int = 200, sweep_iter: int = 60,
                 sweep_samples: int = 10000) -> dict:
    """Val accuracy of the probe with the weight decay chosen on a held-out part of train.

    Returns ``{"top1", "top5", "lr": None, "wd", "optimizer": "lbfgs", "holdout_top1",
    "sweep": {wd: held-out top-1}, "protocol"}``; ``wd`` is the penalty of the final fit on all
    N train samples (mean-loss form).
    """
    return fit_probe(train_x, train_y, val_x, val_y, weight_decays, holdout, seed, device, max_iter,
                     sweep_iter, sweep_samples).record
