"""Run under torchrun (N processes) or plainly (1 process): one JigClu step on a fixed global batch
of pre-made patches through the trainer's path (accelerate-prepared DDP model, accelerator.backward);
rank 0 writes the permutation, the global loss and the gradients to OUT. Used by test_jigclu.
test_convnext has no BatchNorm, so per-process statistics cannot make the runs differ."""

import sys

import torch

from selfsup.config import load_recipe
from selfsup.models import create_backbone
from selfsup.objectives import build_objective
from selfsup.build import end_distributed, make_accelerator


def main(recipe, out, n=8):
    cfg = load_recipe(recipe, ["model.name=test_convnext", "model.small_stem=false", "augment.size=64",
                               "objective.proj_hidden_dim=32", "objective.proj_dim=16"])
    acc = make_accelerator(cfg)
    torch.manual_seed(0)
    model = acc.prepare(build_objective(cfg, create_backbone(cfg.model.name)).double())
    g = torch.Generator().manual_seed(123)
    quads = torch.randn(4, n, 3, 32, 32, generator=g, dtype=torch.float64)  # [P0..P3] of n images
    per = n // acc.num_processes
    local = quads[:, acc.process_index * per:(acc.process_index + 1) * per].reshape(4 * per, 3, 32, 32)
    loss, metrics = model({"patches": local}, None)
    acc.backward(loss)
    total = acc.reduce(loss.detach(), "mean")  # local anchor means, equal counts: the global mean
    objective = acc.unwrap_model(model)
    if acc.is_main_process:
        torch.save({"perm": objective.permutation_log, "loss": total,
                    "grads": {k: p.grad.detach().clone() for k, p in objective.named_parameters()
                              if p.grad is not None}}, out)
    end_distributed(acc)  # no rank exits with gloo's threads up (an abort seen in CI)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
