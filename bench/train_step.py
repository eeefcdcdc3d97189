"""Training-step throughput: selfsup's SimCLR step vs a plain PyTorch loop with lightly's loss.

Both sides train the same timm backbone + lightly SimCLR projection head with AdamW on the same
pre-made views (augmentation excluded, so that only the step is compared). The plain loop is the
one lightly's examples show: two backbone passes (one per view), ``DCLLoss``/``NTXentLoss``,
backward, step. selfsup's side is the trainer's path: an accelerate-prepared objective,
``accelerator.backward``, optimizer step. Prints img/s of each and the ratio (goal ≥ 1.0).

    python bench/train_step.py --model resnet18 --size 32 --batch 128 --loss dcl
    python bench/train_step.py --objective moco --model resnet18 --size 32 --batch 128
    python bench/train_step.py --objective ijepa --model vit_tiny_patch16_224 --size 32 --batch 128

``--objective moco``: lightly's MoCo example loop (query/key encoders with ``update_momentum``,
``NTXentLoss(memory_bank_size=...)``) vs selfsup's ``moco`` objective (queue of the same size).
``--objective ijepa``: lightly's I-JEPA example loop (``MaskedVisionTransformerTIMM`` context and
target encoders, ``IJEPAPredictorTIMM``, smooth L1, EMA) vs selfsup's ``ijepa`` objective on the
same ViT, the same masks (drawn once) and the same images.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from contextlib import nullcontext

import timm
import torch
from lightly.loss import DCLLoss, DCLWLoss, NTXentLoss
from lightly.models.modules import SimCLRProjectionHead

from selfsup.config import load_recipe
from selfsup.models import create_backbone
from selfsup.objectives import build_objective
from selfsup.schedules import EMA
from selfsup.build import make_accelerator

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
    p.add_argument("--objective", default="simclr", choices=("simclr", "moco", "ijepa"))
    p.add_argument("--rounds", type=int, default=3, help="alternations of the two loops (best kept)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    v0 = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device)
    v1 = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device)

    if args.objective != "simclr":
        plain_step, selfsup_step = (moco_steps if args.objective == "moco" else ijepa_steps)(args, v0, v1, device)
        report(args, device, *compare(plain_step, selfsup_step, args))
        return

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
    acc, model, objective, sopt = selfsup_objective(args, [
        f"objective.loss={args.loss}", "objective.temperature=0.1", "objective.proj_hidden_dim=2048",
        "objective.proj_dim=128"], device)
    batch = {"views": [v0, v1]}
    selfsup_step = trainer_step(acc, sopt, objective, lambda: model(batch, None)[0])

    report(args, device, *compare(plain_step, selfsup_step, args))


def compare(plain_step, selfsup_step, args) -> tuple[float, float]:
    """Alternate the two loops for ``--rounds`` rounds and keep each one's best time per step, so
    that load from other processes biases neither side."""
    best = [math.inf, math.inf]
    for _ in range(args.rounds):
        best[0] = min(best[0], timed(plain_step, args.warmup, args.iters))
        best[1] = min(best[1], timed(selfsup_step, args.warmup, args.iters))
    return best[0], best[1]


def report(args, device, t_plain: float, t_self: float) -> None:
    ips_plain, ips_self = args.batch / t_plain, args.batch / t_self
    what = {"simclr": f"loss {args.loss} (2 views per image)", "moco": "MoCo-v2, queue 4096",
            "ijepa": "I-JEPA, 4 targets + 1 context"}[args.objective]
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"device {device}, threads {torch.get_num_threads()}")
    print(f"{args.model} {args.size}px batch {args.batch} {what}")
    print(f"plain loop + lightly      : {ips_plain:8.1f} img/s")
    print(f"selfsup step              : {ips_self:8.1f} img/s")
    print(f"ratio selfsup / plain     : {ips_self / ips_plain:8.2f}")


def trainer_step(acc, opt, objective, forward, momentum=None, region=None):
    """The trainer's optimizer step as a closure: ``forward()`` gives the loss; accelerate
    backward, step, and the EMA of the objective's momentum pairs when ``momentum`` is set
    (gathered once, as the trainer does). ``region(name)``: a context around each part
    (forward, backward, optimizer, ema), e.g. ``torch.profiler.record_function``."""
    ema = EMA(objective.momentum_pairs())
    region = region or (lambda name: nullcontext())

    def step():
        with region("forward"):
            loss = forward()
        with region("backward"):
            acc.backward(loss)
        with region("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        if momentum is not None:
            with region("ema"):
                ema.update(momentum)
    return step


def selfsup_objective(args, overrides, device, recipe="recipes/tiny.yaml"):
    cfg = load_recipe(recipe, [f"model.name={args.model}", "train.precision=fp32", *overrides])
    acc = make_accelerator(cfg)
    from omegaconf import OmegaConf
    objective = build_objective(cfg, create_backbone(args.model, OmegaConf.to_container(cfg.model.kwargs)))
    opt = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-3)
    model, opt = acc.prepare(objective, opt)
    return acc, model, objective, opt


def moco_steps(args, v0, v1, device):
    import copy

    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    backbone = timm.create_model(args.model, pretrained=False, num_classes=0).to(device)
    head = MoCoProjectionHead(backbone.num_features, 2048, 128).to(device)
    key_backbone, key_head = copy.deepcopy(backbone), copy.deepcopy(head)
    deactivate_requires_grad(key_backbone), deactivate_requires_grad(key_head)
    loss_fn = NTXentLoss(temperature=0.2, memory_bank_size=(4096, 128))
    opt = torch.optim.AdamW(list(backbone.parameters()) + list(head.parameters()), lr=1e-3)

    def plain_step():  # lightly's examples/pytorch/moco.py
        update_momentum(backbone, key_backbone, 0.99)
        update_momentum(head, key_head, 0.99)
        q = head(backbone(v0))
        with torch.no_grad():
            k = key_head(key_backbone(v1))
        loss = loss_fn(q, k)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    acc, model, objective, sopt = selfsup_objective(args, [
        "objective.name=moco", "objective.loss=infonce", "objective.temperature=0.2",
        "objective.queue_size=4096", "objective.momentum=0.99", "objective.proj_hidden_dim=2048",
        "objective.proj_dim=128"], device)
    batch = {"views": [v0, v1]}
    selfsup_step = trainer_step(acc, sopt, objective, lambda: model(batch, None)[0], momentum=0.99)
    return plain_step, selfsup_step


def ijepa_steps(args, v0, v1, device):
    import copy

    import torch.nn.functional as F
    from lightly.data import IJEPAMaskCollator
    from lightly.models.modules import IJEPAPredictorTIMM, MaskedVisionTransformerTIMM
    from lightly.models.utils import apply_masks, deactivate_requires_grad, repeat_interleave_batch, update_momentum

    kwargs = dict(img_size=args.size, patch_size=4, depth=6, class_token=False, global_pool="avg", fc_norm=False)
    vit = timm.create_model(args.model, pretrained=False, num_classes=0, **kwargs).to(device)
    encoder = MaskedVisionTransformerTIMM(vit=vit).to(device)
    target = copy.deepcopy(encoder)
    deactivate_requires_grad(target)
    grid = args.size // 4
    predictor = IJEPAPredictorTIMM(num_patches=grid * grid, depth=4, mlp_dim=vit.embed_dim,
                                   predictor_embed_dim=96, num_heads=vit.blocks[0].attn.num_heads).to(device)
    collator = IJEPAMaskCollator(input_size=args.size, patch_size=4, enc_mask_scale=(0.85, 1.0),
                                 pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5), nenc=1, npred=4,
                                 min_keep=4)
    _, enc, pred = collator([torch.zeros(1)] * args.batch)
    enc, pred = [m.to(device) for m in enc], [m.to(device) for m in pred]
    opt = torch.optim.AdamW([p for m in (encoder, predictor) for p in m.parameters() if p.requires_grad], lr=1e-3)

    def plain_step():  # lightly's examples/pytorch/ijepa.py, step part
        with torch.no_grad():
            h = F.layer_norm(target.encode(v0), (vit.embed_dim,))
            h = repeat_interleave_batch(apply_masks(h, pred), len(v0), repeat=len(enc))
        z = predictor(torch.cat([encoder.encode(v0, idx_keep=m) for m in enc]), enc, pred)
        loss = F.smooth_l1_loss(z, h)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_momentum(encoder, target, 0.996)

    kw = [f"model.kwargs.{k}={v}" for k, v in kwargs.items()]
    acc, model, objective, sopt = selfsup_objective(args, [
        "objective.name=ijepa", "objective.pred_depth=4", "objective.pred_dim=96",
        "objective.min_keep=4", f"augment.size={args.size}", *kw], device, "recipes/ijepa_vit_tiny.yaml")

    selfsup_step = trainer_step(acc, sopt, objective, lambda: objective.loss_from_masks(v0, enc, pred)[0],
                                momentum=0.996)

    return plain_step, selfsup_step


if __name__ == "__main__":
    main()
