"""Run under torchrun (N processes, ``bn_splits = 1``) or plainly (1 process, ``bn_splits = N``):
MoCo with shuffle-BN on a BatchNorm backbone, 3 SGD + EMA steps on one fixed global batch per
step, through the trainer's own path (accelerate-prepared DDP model, accelerator.backward), in
float64. The permutation comes from a generator seeded alike on every process (rank 0's is the
one used). Rank 0 writes OUT (a .pt file) with the global loss of every step (the mean over the
processes of their local means) and the final queue. Used by tests/test_moco.py."""

import sys

import torch

from selfsup.config import load_recipe
from selfsup.models import create_backbone
from selfsup.objectives import build_objective
from selfsup.schedules import EMA
from selfsup.build import end_distributed, make_accelerator

GLOBAL_BATCH, GROUPS = 8, 2


def main(recipe, out):
    acc = make_accelerator(load_recipe(recipe, []))
    per = GLOBAL_BATCH // acc.num_processes
    sl = slice(acc.process_index * per, (acc.process_index + 1) * per)
    cfg = load_recipe(recipe, ["model.name=test_resnet", "objective.name=moco", "objective.proj_hidden_dim=32",
                               "objective.queue_size=24", "objective.momentum=0.5", "objective.loss=infonce",
                               "objective.shuffle_bn=true", f"objective.bn_splits={GROUPS // acc.num_processes}",
                               f"train.batch_size={per}"])
    torch.manual_seed(0)  # identical initial weights (and queue) on every process
    moco = build_objective(cfg, create_backbone(cfg.model.name)).double()
    model = acc.prepare(moco)
    optimizer = torch.optim.SGD([p for p in moco.parameters() if p.requires_grad], lr=0.5)
    generator = torch.Generator().manual_seed(7)
    losses = []
    for step in range(3):
        g = torch.Generator().manual_seed(1000 + step)
        v0, v1 = [torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(2)]
        loss, _ = model({"views": [v0[sl], v1[sl]]}, generator)
        losses.append(acc.reduce(loss.detach(), "mean").item())
        acc.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for online, target in moco.momentum_pairs():
            EMA([(online, target)]).update(moco.momentum(step / 3))
    if acc.is_main_process:
        torch.save({"losses": losses, "queue": moco.queue.clone()}, out)
    end_distributed(acc)  # no rank exits with gloo's threads up (an abort seen in CI)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
