"""The ``finetune`` protocol of the suite: backbone + linear head trained end to end on one draw.

VTAB-1k's main protocol (Zhai et al. 2019, "lightweight" sweep): SGD with momentum 0.9, no
weight decay, batch ``min(64, n)``, a cosine learning-rate schedule to 0 over the run (no warm-up),
a zero-initialised linear head on the backbone's pooled features; learning rate × steps chosen
from a small grid (VTAB's {0.001, 0.01} × {500, 2,500}) by training on the draw's train part
(800) and scoring its held-out part (200), then one run with the choice on the whole draw (1,000)
scored on the whole test split. Ties go to the earlier grid point (lr outer, steps inner).

Inputs go through the evaluator's decoding (:mod:`selfsup_eval.data`: shorter side to the
checkpoint's ``input_size``, centre crop, its mean/std). Training adds, per the task's ``augment``
(suite file): ``crop+flip`` (default) a random crop of the image padded by 1/8 of its side
(reflect) and a horizontal flip with probability 1/2; ``crop`` the crop only (for tasks whose
label a mirror changes: position, orientation); ``none``. BatchNorm layers train (batch
statistics), as in VTAB. bf16 autocast on a GPU, fp32 on a CPU. Every run is seeded from the task,
draw and grid point, so a rerun reproduces its numbers on the same device.

``raw-pixels`` has no backbone: its finetune is the linear head alone trained by the same SGD.
"""

from __future__ import annotations

import copy
import hashlib
import math

import torch
from torch import nn
import torch.nn.functional as F

from selfsup_eval.checkpoint import EvalError


class Net(nn.Module):
    """Backbone (pooled as its export says) + linear head; the head starts at 0 as in VTAB."""

    def __init__(self, model: nn.Module | None, pool: str, dim: int, classes: int):
        super().__init__()
        self.model, self.pool = model, pool
        self.head = nn.Linear(dim, classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        if self.model is None:
            f = x.flatten(1)
        elif self.pool == "mean_patch":
            f = self.model.forward_features(x)[:, int(getattr(self.model, "num_prefix_tokens", 0)):].mean(1)
        else:
            f = self.model(x)
        return self.head(f.float())


def cosine_lr(base: float, step: int, total: int) -> float:
    """Learning rate of step ``step`` (0-based) of ``total``: cosine from ``base`` to 0."""
    return base * 0.5 * (1 + math.cos(math.pi * step / total))


def augment(x: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
    """Per-image random crop of the reflect-padded image (pad = side // 8) and flip (see module doc)."""
    if kind == "none":
        return x
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5 if kind == "crop+flip" else torch.zeros(n, dtype=torch.bool)
    out = torch.stack([padded[i, :, oy[i]:oy[i] + h, ox[i]:ox[i] + w] for i in range(n)])
    return torch.where(flip.view(-1, 1, 1, 1).to(x.device), out.flip(3), out)


def seed_of(*parts) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def train(bb, x: torch.Tensor, y: torch.Tensor, classes: int, lr: float, steps: int, batch: int,
          kind: str, seed: int, device) -> Net:
    """One fine-tuning run from the checkpoint's weights; ``x`` normalised (N, C, H, W) on CPU."""
    torch.manual_seed(seed)  # dropout / drop-path inside timm models, if any
    g = torch.Generator().manual_seed(seed)
    model = None if bb.model is None else copy.deepcopy(bb.model).requires_grad_(True).train()
    dim = int(bb.meta.get("feature_dim") or x[0].numel())  # raw pixels: the flattened image
    net = Net(model, bb.meta.get("pool", "head"), dim, classes).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    bf16 = torch.device(device).type == "cuda"
    batch = min(batch, len(x))
    order, pos = torch.randperm(len(x), generator=g), 0
    for step in range(steps):
        if pos + batch > len(order):
            order, pos = torch.randperm(len(x), generator=g), 0
        idx = order[pos:pos + batch]
        pos += batch
        for group in opt.param_groups:
            group["lr"] = cosine_lr(lr, step, steps)
        xb = augment(x[idx], kind, g).to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(net(xb), y[idx].to(device))
        if not torch.isfinite(loss):
            return net.eval()  # a diverged run: scored as it is (it will lose the grid)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def predict(net: Net, x: torch.Tensor, device, batch: int = 256) -> torch.Tensor:
    bf16 = torch.device(device).type == "cuda"
    out = []
    for i in range(0, len(x), batch):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            out.append(net(x[i:i + batch].to(device)).float().argmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def image_batches(bb, urls, batch: int = 256):
    """(keys, normalised images (B, C, S, S), labels) of the decodable labelled samples of
    ``urls``, ``batch`` at a time (a 224-px test split held whole would take gigabytes)."""
    from selfsup_eval.data import iter_samples, safe_decode
    from selfsup_eval.features import transform_settings

    t = transform_settings(bb)
    mean = torch.tensor(t["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(t["std"]).view(1, -1, 1, 1)
    keys, imgs, labels = [], [], []

    def flush():
        out = (list(keys), (torch.stack(imgs).float() / 255 - mean) / std, torch.tensor(labels, dtype=torch.long))
        keys.clear(), imgs.clear(), labels.clear()
        return out

    for s in iter_samples(urls):
        if s.label is None or s.data is None:
            continue
        img = safe_decode((s.data, t["size"], t["channels"]))
        if img is not None:
            keys.append(s.key), imgs.append(img), labels.append(s.label)
        if len(imgs) == batch:
            yield flush()
    if imgs:
        yield flush()


def load_images(bb, urls) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """All of a (small) split at once: the draw's 1,000 images."""
    parts = list(image_batches(bb, urls))
    if not parts:
        raise EvalError(f"finetune: no decodable labelled images in {urls[0]}")
    return sum((k for k, _, _ in parts), []), torch.cat([x for _, x, _ in parts]), torch.cat([y for _, _, y in parts])


def task_classes(bb, task) -> int:
    """The head's size must cover the test labels too (a class the draw lacks is never
    predicted, as in VTAB): one label-only pass over the test split (no decoding)."""
    from selfsup_eval.data import iter_samples

    labels = [s.label for s in iter_samples(task.test.urls) if s.label is not None]
    return max(labels) + 1 if labels else 0


def finetune_protocol(bb, draw, task, args):
    """``(record, test keys, BoolTensor correct)`` for one draw of one task."""
    keys, x, y = load_images(bb, draw.shards.urls)
    classes = max(int(y.max()) + 1, task_classes(bb, task))
    val = draw.val_keys
    hold = torch.tensor([k in val for k in keys])
    if hold.all() or not hold.any():
        raise EvalError(f"task {task.name}: draw {draw.index} has no decodable images on one side of its split")
    grid = {}
    for lr in args.finetune_lr:
        for steps in args.finetune_steps:
            net = train(bb, x[~hold], y[~hold], classes, lr, steps, args.finetune_batch, task.augment,
                        seed_of(task.name, draw.index, lr, steps), args.device)
            grid[(lr, steps)] = float((predict(net, x[hold], args.device) == y[hold]).float().mean())
    best = max(grid, key=lambda k: grid[k])  # max keeps the first of equal values
    lr, steps = best
    net = train(bb, x, y, classes, lr, steps, args.finetune_batch, task.augment,
                seed_of(task.name, draw.index, lr, steps, "all"), args.device)
    tkeys, correct = [], []
    for k, tx, ty in image_batches(bb, task.test.urls):
        tkeys += k
        correct.append(predict(net, tx, args.device) == ty)
    correct = torch.cat(correct)
    record = {"top1": float(correct.float().mean()), "lr": lr, "steps": steps, "holdout_top1": grid[best],
              "batch": min(args.finetune_batch, len(x)), "augment": task.augment,
              "grid": [{"lr": a, "steps": b, "holdout_top1": v} for (a, b), v in grid.items()]}
    return record, tkeys, correct
