"""Run under torchrun (N processes) or plainly (1 process): the gradients of one SimCLR step on a
fixed global batch of views, through the trainer's own path (accelerate-prepared DDP model,
accelerator.backward), written by rank 0 to OUT (a .pt file). Used by test_distributed."""

import sys

import torch

from selfsup.config import load_recipe
from selfsup.models import create_backbone
from selfsup.objectives import build_objective
from selfsup.build import end_distributed, make_accelerator


def main(recipe, out, loss, global_batch=8):
    cfg = load_recipe(recipe, ["model.name=test_convnext", "objective.proj_batch_norm=false",
                               f"objective.loss={loss}", "objective.proj_hidden_dim=32"])
    acc = make_accelerator(cfg)
    torch.manual_seed(0)
    # float64, so that the comparison measures the gather logic, not float32 summation order
    model = acc.prepare(build_objective(cfg, create_backbone(cfg.model.name)).double())
    g = torch.Generator().manual_seed(123)
    v0 = torch.randn(global_batch, 3, 32, 32, generator=g, dtype=torch.float64)
    v1 = torch.randn(global_batch, 3, 32, 32, generator=g, dtype=torch.float64)
    per = global_batch // acc.num_processes
    sl = slice(acc.process_index * per, (acc.process_index + 1) * per)
    loss_value, _ = model({"views": [v0[sl], v1[sl]]}, None)
    acc.backward(loss_value)
    if acc.is_main_process:
        grads = {n: p.grad.detach().clone() for n, p in acc.unwrap_model(model).named_parameters()}
        torch.save(grads, out)
    end_distributed(acc)  # no rank exits with gloo's threads up (an abort seen in CI)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
