"""Training-step throughput: selfsup's SimCLR step vs a plain PyTorch loop with lightly's loss.

Both sides train the same timm backbone + lightly SimCLR projection head with AdamW on the same
pre-made views (augmentation excluded, so that only the step is compared). The plain loop is the
one lightly's examples show: two backbone passes (one per view), ``DCLLoss``/``NTXentLoss``,
backward, step. selfsup's side is the trainer's path: an accelerate-prepared objective,
``accelerator.backward``, optimizer step. Prints img/s of each and the ratio (goal ≥ 1.0).

    python bench/train_step.py --model resnet18 --size 32 --batch 128 --loss dcl
"""

from __future__ import annotations

import argparse
import platform
import time

import timm
import torch
from lightly.loss import DCLLoss, DCLWLoss, NTXentLoss
from lightly.models.modules import SimCLRProjectionHead

from selfsup.config import load_recipe
from selfsup.models import create_backbone
from selfsup.objectives import build_objective
from selfsup.trainer import make_accelerator

LIGHTLY = {"infonce": NTXentLoss, "dcl": DCLLoss, "dclw": DCLWLoss}


def timed(step, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--loss", default="dcl", choices=sorted(LIGHTLY))
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    v0 = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device)
    v1 = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device)

    # plain loop, as in lightly's examples
    backbone = timm.create_model(args.model, pretrained=False, num_classes=0).to(device)
    head = SimCLRProjectionHead(backbone.num_features, 2048, 128).to(device)
    plain = torch.nn.Sequential(backbone, head)
    loss_fn = LIGHTLY[args.loss](temperature=0.1)
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-3)

    def plain_step():
        loss = loss_fn(plain(v0), plain(v1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # selfsup's trainer path
    cfg = load_recipe("recipes/tiny.yaml", [f"model.name={args.model}", f"objective.loss={args.loss}",
                                            "objective.temperature=0.1", "objective.proj_hidden_dim=2048",
                                            "objective.proj_dim=128", "train.precision=fp32"])
    acc = make_accelerator(cfg)
    objective = build_objective(cfg, create_backbone(args.model))
    sopt = torch.optim.AdamW(objective.parameters(), lr=1e-3)
    model, sopt = acc.prepare(objective, sopt)
    batch = {"views": [v0, v1]}

    def selfsup_step():
        loss, _ = model(batch, None)
        acc.backward(loss)
        sopt.step()
        sopt.zero_grad(set_to_none=True)

    t_plain = timed(plain_step, args.warmup, args.iters)
    t_self = timed(selfsup_step, args.warmup, args.iters)
    ips_plain, ips_self = args.batch / t_plain, args.batch / t_self
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"device {device}, threads {torch.get_num_threads()}")
    print(f"{args.model} {args.size}px batch {args.batch} loss {args.loss} (2 views per image)")
    print(f"plain loop + lightly loss : {ips_plain:8.1f} img/s")
    print(f"selfsup step              : {ips_self:8.1f} img/s")
    print(f"ratio selfsup / plain     : {ips_self / ips_plain:8.2f}")


if __name__ == "__main__":
    main()
