"""The VTAB-1k protocol on frozen features: k-NN, linear and k-NN ⊕ linear for one draw of a task.

VTAB's rule (Zhai et al. 2019) for every protocol: choose each hyper-parameter on the draw's
train part (800) scored on its held-out part (200), then refit on all of the draw (1,000) with
the choice and score the task's whole test split once. Here:

* ``knn``: k and T from :func:`selfsup_eval.knn_linear.tune` (the k-NN ⊕ linear grids, k-NN
  alone) on 800 → 200, then the weighted k-NN of :mod:`selfsup_io.knn` with all 1,000 as the
  datastore;
* ``linear``: the project's probe (:func:`selfsup_eval.linear.fit_probe`, L-BFGS logistic
  regression on standardised features), its penalty chosen on the 200, refit on the 1,000;
* ``knn_linear``: :func:`selfsup_eval.knn_linear.knn_linear` with the 200 as its hold-out (λ, k,
  T chosen there, the datastore and probe then all 1,000).

A test class absent from a 1,000-example draw (Caltech101, SUN397) is simply never predicted, as
in VTAB; the class count is the largest label of train and test. Besides each protocol's record
(accuracies as fractions, like every other results.json record) the functions return the per-test-
image correctness, which the paired verdict (:mod:`selfsup_eval.verdict`) needs.
"""

from __future__ import annotations

import torch

from selfsup_eval.knn_linear import knn_linear, tune
from selfsup_eval.linear import fit_probe
from selfsup_io.knn import knn_classify

FROZEN = ("knn", "linear", "knn_linear")
PROTOCOLS = FROZEN + ("finetune",)


def _split(n: int, hold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.ones(n, dtype=torch.bool)
    keep[hold] = False
    return keep.nonzero().squeeze(1), hold


def knn_protocol(x, y, tx, ty, hold: torch.Tensor, num_classes: int, device="cpu"):
    """k and T chosen on rest → hold, then k-NN over all of ``x`` on the test split."""
    rest, hold = _split(len(x), hold)
    x, tx = x.float().to(device), tx.float().to(device)
    sig = tune(x[rest.to(device)], y[rest].to(device), x[hold.to(device)], y[hold].to(device), num_classes)
    k = min(sig["k"], len(x))
    ranked = knn_classify(x, y, tx, ks=(k,), temperature=sig["temperature"], num_classes=num_classes)[k]
    correct = (ranked[:, 0].cpu() == ty.cpu())
    return {"top1": float(correct.float().mean()), "k": k, "temperature": sig["temperature"],
            "holdout_top1": sig["holdout_top1"]}, correct


def linear_protocols(x, y, tx, ty, hold: torch.Tensor, num_classes: int, with_knn: bool, device="cpu"):
    """The linear probe (and k-NN ⊕ linear when ``with_knn``) with choices on ``hold``."""
    out, correct = {}, {}
    if with_knn:
        both = knn_linear(x, y, tx, ty, device=device, hold=hold, return_probs=True)
        lin, logits = both["linear"], both["val_logits"]
        kl = both["knn_linear"]
        pred = both["val_probs"].argmax(1)
        correct["knn_linear"] = pred.cpu() == ty.cpu()
        out["knn_linear"] = {"top1": float(correct["knn_linear"].float().mean()), "lambda": kl["lambda"],
                             "k": kl["k"], "temperature": kl["temperature"], "holdout_top1": kl["holdout_top1"]}
    else:
        fit = fit_probe(x, y, tx, ty, device=device, hold=hold, num_classes=num_classes)
        lin, logits = fit.record, fit.val_logits
    correct["linear"] = logits.argmax(1).cpu() == ty.cpu()
    out["linear"] = {"top1": float(correct["linear"].float().mean()), "wd": lin["wd"],
                     "holdout_top1": lin["holdout_top1"]}
    return out, correct


def frozen(ftrain: dict, ftest: dict, hold: torch.Tensor, protocols, device="cpu"):
    """``({protocol: record}, {protocol: BoolTensor (n_test,)})`` for one draw of one task."""
    x, y, tx, ty = ftrain["features"], ftrain["label"], ftest["features"], ftest["label"]
    c = int(max(y.max(), ty.max())) + 1
    records, correct = {}, {}
    if "knn" in protocols:
        records["knn"], correct["knn"] = knn_protocol(x, y, tx, ty, hold, c, device)
    if "linear" in protocols or "knn_linear" in protocols:
        r, cr = linear_protocols(x, y, tx, ty, hold, c, "knn_linear" in protocols, device)
        for p in ("linear", "knn_linear"):
            if p in protocols:
                records[p], correct[p] = r[p], cr[p]
    return records, correct


def summarise(runs: list[dict]) -> dict:
    """One protocol's per-draw records → ``{top1: mean, std, subsets: [...]}`` plus the first
    draw's chosen hyper-parameters at the top level (the shape of issue 32's records)."""
    t = torch.tensor([r["top1"] for r in runs], dtype=torch.float64)
    out = {k: v for k, v in runs[0].items() if k != "top1"}
    out.update(top1=float(t.mean()), std=float(t.std()) if len(runs) > 1 else 0.0)
    if len(runs) > 1:
        out["subsets"] = runs
    return out


def aggregate(tasks: dict, protocols) -> tuple[dict, dict]:
    """Per-protocol group means and overall mean (unweighted mean over tasks, as VTAB)."""
    groups, mean = {}, {}
    for p in protocols:
        vals = {name: t[p]["top1"] for name, t in tasks.items() if p in t}
        if not vals:
            continue
        by_group: dict[str, list[float]] = {}
        for name, v in vals.items():
            by_group.setdefault(tasks[name]["group"], []).append(v)
        for g, vs in by_group.items():
            groups.setdefault(g, {})[p] = sum(vs) / len(vs)
        mean[p] = sum(vals.values()) / len(vals)
    return groups, mean
