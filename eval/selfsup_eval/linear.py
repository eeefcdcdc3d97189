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
``optimizer: "lbfgs"``. The sweep runs from the strongest penalty to the weakest, each fit warm-
started from the previous solution (the regularisation path converges in a few iterations per
point), and the final fit starts from the chosen point's solution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WEIGHT_DECAYS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
PROTOCOL = "cached-feature protocol (no augmentation): L-BFGS logistic regression on standardised features"


def standardise(train_x: torch.Tensor, *others: torch.Tensor):
    """(train, *others) scaled by the train mean/std; constant train features stay centred only
    (dividing by ~0 would blow up any val sample where they are not constant)."""
    mean, std = train_x.mean(0), train_x.std(0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return [(x - mean) / std for x in (train_x, *others)]


def fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, init=None,
        max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise mean cross-entropy + wd/2 * ||W||^2 with full-batch L-BFGS; returns (W, b)."""
    if init is None:
        w = torch.zeros(x.shape[1], num_classes, device=x.device)
        b = torch.zeros(num_classes, device=x.device)
    else:
        w, b = (t.clone() for t in init)
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(torch.addmm(b, x, w), y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def accuracy(logits: torch.Tensor, y: torch.Tensor, k: int = 1) -> float:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == y.view(-1, 1)).any(1).float().mean().item()


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor,
                 val_y: torch.Tensor, weight_decays=WEIGHT_DECAYS, holdout: float = 0.1,
                 seed: int = 0, device="cpu", max_iter: int = 200, sweep_iter: int = 100) -> dict:
    """Val accuracy of the probe with the weight decay chosen on a held-out part of train.

    Returns ``{"top1", "top5", "lr": None, "wd", "optimizer": "lbfgs", "holdout_top1",
    "sweep": {wd: held-out top-1}, "protocol"}``.
    """
    train_x, val_x = train_x.float().to(device), val_x.float().to(device)
    train_y, val_y = train_y.long().to(device), val_y.long().to(device)
    if len(train_x) < 2:
        raise ValueError(f"the linear probe needs at least 2 train samples, got {len(train_x)}")
    c = int(max(train_y.max(), val_y.max())) + 1
    train_x, val_x = standardise(train_x, val_x)
    perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed)).to(device)
    n_hold = min(len(train_x) - 1, max(1, round(holdout * len(train_x))))
    hold, rest = perm[:n_hold], perm[n_hold:]
    sweep, solutions, init = {}, {}, None
    for wd in sorted(weight_decays, reverse=True):  # strong → weak, warm-started path
        init = fit(train_x[rest], train_y[rest], c, wd, init, max_iter=sweep_iter)
        solutions[wd] = init
        sweep[wd] = accuracy(train_x[hold] @ init[0] + init[1], train_y[hold], 1)
    best = max(sweep, key=lambda wd: (sweep[wd], wd))  # ties → the stronger penalty
    w, b = fit(train_x, train_y, c, best, solutions[best], max_iter=max_iter)
    logits = val_x @ w + b
    return {"top1": accuracy(logits, val_y, 1), "top5": accuracy(logits, val_y, 5), "lr": None,
            "wd": best, "optimizer": "lbfgs", "holdout_top1": sweep[best],
            "sweep": {f"{wd:g}": acc for wd, acc in sweep.items()}, "protocol": PROTOCOL}
