"""k-NN ⊕ linear: the nearest-neighbour classifier integrated with the linear probe.

Method of Jia et al. 2021, "Rethinking Nearest Neighbors for Visual Classification", as their
official code (KMnP/nn-revisit) does it; docs/methods.md §6.4 says it in the project's words.

* **Interpolation** (their ``combine_knn_and_linear_probs``): ``p = λ·p_kNN + (1 − λ)·p_linear``,
  where ``p_linear`` is the softmax of the probe's logits and ``p_kNN`` the k nearest training
  samples' votes ``exp(s/T)`` summed per class and normalised to sum 1. λ, k and T are chosen
  together on the held-out part of the train split (the same part the probe picked its penalty
  on; the k-NN datastore is then the rest of train and the linear probabilities come from the
  probe fitted without the held-out images), never on val: best held-out top-1, ties to the
  better held-out k-NN top-1, then to the first point of the grid in their order (T outer, k,
  then λ). Val is scored with the datastore = all of train and the final probe.
* **k-NN as an easy/hard signal while training** (their ``knn_reg`` loss, an option of the
  probe, ``--knn-loss COEFF``): each train image's cross-entropy is multiplied by
  ``1 + COEFF·min(−log p_kNN(y), 100)``, with ``p_kNN`` its leave-one-out k-NN probability of its
  own label (the image itself is not its own neighbour), k and T chosen by k-NN top-1 alone on
  the held-out part. Images their neighbours already classify (easy) keep weight ~1; images the
  neighbours get wrong (hard) weigh more. The sum is divided by N as in their loss. The sweep fits
  that choose the probe's penalty on the held-out part use weights computed within the rest of
  train, so no held-out label reaches them; the final fit's weights use all of train.

Grids (theirs): T ∈ {1e-4, 1e-3, 1e-2, 0.1, 1, 10, 0.02…0.09, 0.2…0.9}, λ ∈ {0.05, 0.10, …, 0.95},
k ∈ {1, 2, 4, …, 512} plus the mean number of images per class. Departures: their k-NN
centres features with the train mean and uses squared L2 distance; here the k-NN is the project's
(cosine on L2-normalised features, :mod:`selfsup_io.knn`), so the k-NN column and the k-NN half
of the combination are one classifier (on unit vectors −‖q−x‖² = 2s − 2, i.e. their vote at T is
this one at T/2, up to the centring). Their grid caps k at the number of classes (a quirk that
leaves 10-class problems k ≤ 10); here k is capped by the datastore size only. With no held-out
image (1-shot: a class with one image cannot spare it) nothing can be compared: λ = 0.5, k =
min(20, N), T = 0.07 (the k-NN column's settings) are used and the record says ``tuned: false``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsup_eval.linear import default_holdout, fit_probe
from selfsup_io.errors import UserError

TEMPERATURES = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09,
                0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
KS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LAMBDAS = tuple(round(0.05 * i, 2) for i in range(1, 20))
NLL_CLAMP = 100.0  # their clamp(log p, min=-100)
DEFAULTS = {"lambda": 0.5, "k": 20, "temperature": 0.07}


@torch.no_grad()
def neighbours(train_x: torch.Tensor, query_x: torch.Tensor, kmax: int, exclude: torch.Tensor | None = None,
               chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and train indices of each query's ``kmax`` nearest, best first.

    ``exclude`` (Q,): a train index per query that may not be its neighbour (leave-one-out when
    the queries are the train samples themselves). Computed on ``train_x.device``, in chunks."""
    train = F.normalize(train_x.float(), dim=1)
    limit = len(train) - (exclude is not None)
    if not 1 <= kmax <= limit:
        raise UserError(f"k={kmax} needs at least {kmax + (exclude is not None)} train samples, have {len(train)}")
    sims, idx = [], []
    for start in range(0, len(query_x), chunk_size):
        q = F.normalize(query_x[start:start + chunk_size].to(train.device).float(), dim=1)
        s = q @ train.T
        if exclude is not None:
            s.scatter_(1, exclude[start:start + chunk_size].to(s.device).view(-1, 1), float("-inf"))
        v, i = s.topk(kmax, dim=1)
        sims.append(v), idx.append(i)
    return torch.cat(sims), torch.cat(idx)


def knn_probs(sims: torch.Tensor, idx: torch.Tensor, train_y: torch.Tensor, k: int, temperature: float,
              num_classes: int) -> torch.Tensor:
    """(Q, C) k-NN class probabilities: votes ``exp(s/T)`` of the first ``k`` neighbours summed
    per class, normalised to 1. Weighted as ``exp((s − s_1)/T)``: the per-query factor cancels in
    the normalisation, and T = 1e-4 cannot overflow."""
    w = ((sims[:, :k] - sims[:, :1]) / temperature).exp()
    votes = torch.zeros(len(sims), num_classes, device=sims.device)
    votes.scatter_add_(1, train_y.to(sims.device)[idx[:, :k]], w)
    return votes / votes.sum(1, keepdim=True)


def combine(p_knn: torch.Tensor, p_linear: torch.Tensor, lam: float) -> torch.Tensor:
    """``λ·p_kNN + (1 − λ)·p_linear`` (their ``combine_knn_and_linear_probs``, softmax case)."""
    return lam * p_knn + (1 - lam) * p_linear


def k_grid(n_store: int, n_classes: int) -> list[int]:
    mean_per_class = max(1, round(n_store / max(1, n_classes)))
    return sorted({k for k in (*KS, mean_per_class) if k <= n_store})


def _top1(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy along the last two dims: p (..., Q, C), y (Q,)."""
    return (p.argmax(-1) == y.to(p.device)).float().mean(-1)


@torch.no_grad()
def tune(store_x, store_y, hold_x, hold_y, num_classes: int, p_linear: torch.Tensor | None = None,
         temperatures=TEMPERATURES, lambdas=LAMBDAS) -> dict:
    """(T, k[, λ]) with the best held-out top-1 of k-NN ⊕ linear, or of k-NN alone when
    ``p_linear`` is None. Ties: better k-NN top-1, then the first grid point (T, k, λ order)."""
    ks = k_grid(len(store_x), int(store_y.unique().numel()))
    sims, idx = neighbours(store_x, hold_x, ks[-1])
    lam = torch.tensor(lambdas, device=sims.device).view(-1, 1, 1)
    best, best_key = None, None
    for t in temperatures:
        for k in ks:
            pk = knn_probs(sims, idx, store_y, k, t, num_classes)
            knn_acc = float(_top1(pk, hold_y))
            if p_linear is None:
                cand = [(knn_acc, knn_acc, {"k": k, "temperature": t})]
            else:
                accs = _top1(combine(pk, p_linear.to(sims.device), lam), hold_y).tolist()
                cand = [(a, knn_acc, {"k": k, "temperature": t, "lambda": lambdas[j]}) for j, a in enumerate(accs)]
            for acc, kacc, params in cand:
                if best_key is None or (acc, kacc) > best_key:
                    best, best_key = {**params, "holdout_top1": acc, "holdout_knn_top1": kacc}, (acc, kacc)
    return best


@torch.no_grad()
def knn_loss_weights(train_x, train_y, k: int, temperature: float, coeff: float, num_classes: int) -> torch.Tensor:
    """Per-image loss weights ``1 + coeff·min(−log p_kNN(y_i), 100)`` from the leave-one-out k-NN."""
    n = len(train_x)
    sims, idx = neighbours(train_x, train_x, k, exclude=torch.arange(n, device=train_x.device))
    p = knn_probs(sims, idx, train_y, k, temperature, num_classes)
    p_own = p.gather(1, train_y.to(p.device).view(-1, 1)).squeeze(1)
    return 1 + coeff * (-torch.log(p_own)).clamp(max=NLL_CLAMP)


def rest_only_weights(train_x, train_y, rest: torch.Tensor, sig: dict, coeff: float, num_classes: int) -> torch.Tensor | None:
    """The k-NN loss weights of the sweep fits: leave-one-out within the non-held-out part only,
    so the penalty chosen on the held-out part never used a held-out label (N,; held-out entries 1,
    unused). None when nothing is held out (the full weights are then these) or under 2 images remain."""
    n = len(train_x)
    if len(rest) == n or len(rest) < 2:
        return None
    out = torch.ones(n, device=train_x.device)
    out[rest] = knn_loss_weights(train_x[rest], train_y[rest], min(sig["k"], len(rest) - 1),
                                 sig["temperature"], coeff, num_classes)
    return out


def _accuracy(p: torch.Tensor, y: torch.Tensor, k: int) -> float:
    k = min(k, p.shape[1])
    return (p.topk(k, dim=1).indices == y.to(p.device).view(-1, 1)).any(1).float().mean().item()


@torch.no_grad()
def knn_linear(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, *,
               device="cpu", knn_loss: float = 0.0, hold: torch.Tensor | None = None, seed: int = 0,
               return_probs: bool = False, **probe_kw) -> dict:
    """Linear probe and k-NN ⊕ linear from one probe fit.

    Returns ``{"linear": probe record, "knn_linear": {"top1", "top5", "lambda", "k",
    "temperature", "holdout_top1", "holdout_knn_top1", "tuned"}}`` (plus ``"val_probs"`` when
    ``return_probs``). ``hold``: train indices held out for every choice (default: the probe's
    seeded random 10 %). ``knn_loss`` > 0 trains the probe with the k-NN-weighted loss."""
    train_x, val_x = train_x.float().to(device), val_x.float().to(device)
    train_y, val_y = train_y.long().to(device), val_y.long().to(device)
    n, c = len(train_x), int(max(train_y.max(), val_y.max())) + 1
    if n < 2:
        raise UserError(f"k-NN ⊕ linear needs at least 2 train samples, got {n}")
    hold = default_holdout(n, probe_kw.get("holdout", 0.1), seed) if hold is None else hold.long().cpu()
    keep = torch.ones(n, dtype=torch.bool)
    keep[hold] = False
    rest = keep.nonzero().squeeze(1)
    hold_d, rest_d = hold.to(device), rest.to(device)
    weights, sweep_weights, loss_info = None, None, None
    if knn_loss > 0:
        if len(hold):
            sig = tune(train_x[rest_d], train_y[rest_d], train_x[hold_d], train_y[hold_d], c)
        else:
            sig = {"k": DEFAULTS["k"], "temperature": DEFAULTS["temperature"]}
        sig["k"] = min(sig["k"], n - 1)
        weights = knn_loss_weights(train_x, train_y, sig["k"], sig["temperature"], knn_loss, c)
        sweep_weights = rest_only_weights(train_x, train_y, rest_d, sig, knn_loss, c)
        loss_info = {"coeff": knn_loss, "k": sig["k"], "temperature": sig["temperature"],
                     "mean_weight": float(weights.mean())}
    fit = fit_probe(train_x, train_y, val_x, val_y, device=device, seed=seed, hold=hold,
                    sample_weight=weights, sweep_weight=sweep_weights, num_classes=c, **probe_kw)
    linear = dict(fit.record)
    if loss_info:
        linear["knn_loss"] = loss_info
    if fit.hold_logits is not None:
        best = tune(train_x[rest_d], train_y[rest_d], train_x[hold_d], train_y[hold_d], c,
                    p_linear=fit.hold_logits.softmax(1))
        tuned = True
    else:
        best = {**DEFAULTS, "k": min(DEFAULTS["k"], n), "holdout_top1": None, "holdout_knn_top1": None}
        tuned = False
    sims, idx = neighbours(train_x, val_x, best["k"])
    p = combine(knn_probs(sims, idx, train_y, best["k"], best["temperature"], c),
                fit.val_logits.softmax(1), best["lambda"])
    record = {"top1": _accuracy(p, val_y, 1), "top5": _accuracy(p, val_y, 5), "lambda": best["lambda"],
              "k": best["k"], "temperature": best["temperature"], "holdout_top1": best["holdout_top1"],
              "holdout_knn_top1": best["holdout_knn_top1"], "tuned": tuned,
              "knn_loss": knn_loss if knn_loss > 0 else None}
    out = {"linear": linear, "knn_linear": record}
    if return_probs:
        out["val_probs"] = p.cpu()
        out["val_logits"] = fit.val_logits.cpu()
    return out
