"""Linear probe on cached features (no augmentation).

The classic protocol (90-100 epochs of SGD through the frozen backbone with augmentation) costs
hours per checkpoint; on cached features a multinomial logistic regression trained to convergence
with full-batch L-BFGS takes seconds and ranks checkpoints the same way (dino #141 asks for exactly
this). Features are standardised with the train statistics. The L2 penalty is chosen on a seeded
10% held-out part of the train split (fitting on at most 10k of the rest), then the probe is refit on the whole train split. L-BFGS has
no learning rate to tune (its line search sets the step), so the sweep is over weight decay only.
The output says plainly that this is the cached-feature protocol.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)


def fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float,
        max_iter: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression: mean cross-entropy + wd/2·‖W‖² (bias unpenalised)."""
    w = torch.zeros(x.shape[1], num_classes, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def accuracy(logits: torch.Tensor, y: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == y.view(-1, 1)).any(1).float().mean().item()


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor,
                 val_y: torch.Tensor, weight_decays=WEIGHT_DECAYS, holdout: float = 0.1,
                 seed: int = 0, device: str = "cpu", sweep_samples: int = 10000) -> dict:
    """Probe accuracy on ``val``. The weight-decay sweep fits on at most ``sweep_samples`` of
    the non-held-out train samples (the choice is stable and the sweep cheaper); the final
    probe is fit on the whole train split."""
    train_x, val_x = train_x.float().to(device), val_x.float().to(device)
    train_y, val_y = train_y.long().to(device), val_y.long().to(device)
    c = int(max(train_y.max(), val_y.max())) + 1
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed)).to(device)
    n_hold = max(1, int(holdout * len(train_x)))
    hold, fit_idx = perm[:n_hold], perm[n_hold:n_hold + sweep_samples]
    sweep = {}
    for wd in weight_decays:
        w, b = fit(train_x[fit_idx], train_y[fit_idx], c, wd, max_iter=100)
        sweep[wd] = accuracy(train_x[hold] @ w + b, train_y[hold], 1)
    best = max(sweep, key=lambda wd: (sweep[wd], wd))  # ties → stronger regularisation
    w, b = fit(train_x, train_y, c, best, max_iter=150)
    logits = val_x @ w + b
    return {"top1": accuracy(logits, val_y, 1), "top5": accuracy(logits, val_y, 5),
            "wd": best, "lr": "lbfgs", "holdout_top1": sweep[best],
            "sweep": {f"{wd:g}": acc for wd, acc in sweep.items()},
            "protocol": "cached features, no augmentation, L-BFGS logistic regression"}
