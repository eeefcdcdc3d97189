"""Run under torchrun (N processes) or plainly (1 process) on one fixed global batch per step,
through the trainer's own path (accelerate-prepared DDP model, accelerator.backward, the
objective's momentum pairs), in float64; rank 0 writes OUT (a .pt file) with

* ``queue``/``queue_ptr``: MoCo's queue after 4 SGD + EMA steps (K = 24, global batch 8: wraps);
* ``keys``: the normalised keys of every step, computed on the whole global batch by rank 0;
* ``halluc_grads``: the gradients of one SimCLR + Hallucinator step (DCL), λ drawn from a
  generator seeded alike on every rank, so 1 and N processes must agree;
* ``same_class``: SimCLR + MoCHi's ``mochi_hard_same_class`` on rank 0, and ``same_class_loop``
  the same share by a slow loop over rank 0's anchors against the whole global batch (labels in
  the wrong order across ranks would make them differ).

Used by tests/test_moco.py and tests/test_hallucinator.py (one launch serves both)."""

import sys

import torch

from selfsup.config import load_recipe
from selfsup.models import create_backbone
from selfsup.objectives import build_objective
from selfsup.schedules import EMA
from selfsup.build import end_distributed, make_accelerator

GLOBAL_BATCH = 8


def views(step, size=32):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(GLOBAL_BATCH, 3, size, size, generator=g, dtype=torch.float64) for _ in range(2)]


def build(recipe, acc, overrides):
    per = GLOBAL_BATCH // acc.num_processes
    cfg = load_recipe(recipe, ["model.name=test_convnext", "objective.proj_hidden_dim=32",
                               f"train.batch_size={per}", *overrides])
    torch.manual_seed(0)  # identical initial weights (and queue) on every process
    objective = build_objective(cfg, create_backbone(cfg.model.name)).double()
    return acc.prepare(objective), objective


def main(recipe, out):
    acc = make_accelerator(load_recipe(recipe, []))
    per = GLOBAL_BATCH // acc.num_processes
    sl = slice(acc.process_index * per, (acc.process_index + 1) * per)

    model, moco = build(recipe, acc, ["objective.name=moco", "objective.queue_size=24",
                                      "objective.momentum=0.5", "objective.loss=infonce"])
    optimizer = torch.optim.SGD([p for p in moco.parameters() if p.requires_grad], lr=0.5)
    keys = []
    for step in range(4):
        v0, v1 = views(step)
        if acc.is_main_process:
            keys.append(moco.keys(v1))  # no BN in test_convnext: batch-independent
        loss, _ = model({"views": [v0[sl], v1[sl]]}, None)
        acc.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for online, target in moco.momentum_pairs():
            EMA([(online, target)]).update(moco.momentum(step / 4))

    model, simclr = build(recipe, acc, ["objective.name=simclr", "objective.loss=dcl",
                                        "objective.proj_batch_norm=false",
                                        "objective.hallucinator.enabled=true"])
    v0, v1 = views(99)
    loss, metrics = model({"views": [v0[sl], v1[sl]]}, torch.Generator().manual_seed(7))
    acc.backward(loss)
    halluc_lambda = metrics["halluc_lambda"]

    model, mochi = build(recipe, acc, ["objective.name=simclr", "objective.proj_batch_norm=false",
                                       "objective.mochi.n=4", "objective.mochi.s=2", "objective.mochi.s_prime=1",
                                       "objective.mochi.start_epoch=0",
                                       "monitor.every_steps=5", "data.val=labelled-{0..1}.tar"])
    labels = torch.tensor([0, 1, 2, 3, 0, 0, 1, 2])
    v0, v1 = views(98)
    with torch.no_grad():  # a forward for its metric only
        _, metrics = model({"views": [v0[sl], v1[sl]], "epoch": 0.0, "label": labels[sl]},
                           torch.Generator().manual_seed(8))
    if acc.is_main_process:
        with torch.no_grad():  # no BatchNorm anywhere: the global batch's rows, computed here
            z = torch.nn.functional.normalize(mochi.embed(torch.cat([v0, v1])), dim=1)
        same = known = 0
        for a in [*range(sl.start, sl.stop), *range(GLOBAL_BATCH + sl.start, GLOBAL_BATCH + sl.stop)]:
            partner = (a + GLOBAL_BATCH) % (2 * GLOBAL_BATCH)
            sims = sorted(((float(z[a] @ z[j]), j) for j in range(2 * GLOBAL_BATCH) if j not in (a, partner)),
                          reverse=True)
            for _, j in sims[:4]:
                known += 1
                same += int(labels[a % GLOBAL_BATCH] == labels[j % GLOBAL_BATCH])
        torch.save({"queue": moco.queue.clone(), "queue_ptr": moco.queue_ptr.clone(),
                    "same_class": metrics["mochi_hard_same_class"].item(), "same_class_loop": same / known,
                    "keys": keys, "lambda": halluc_lambda,
                    "halluc_grads": {n: p.grad.clone() for n, p in simclr.named_parameters()
                                     if p.grad is not None}}, out)
    end_distributed(acc)  # no rank exits with gloo's threads up (an abort seen in CI)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
