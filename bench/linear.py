"""Linear-probe cost: cached-feature L-BFGS probe vs the classic frozen-backbone SGD probe.

The classic protocol (MoCo/JigClu/Hallucinator repos) trains a linear layer for 90 epochs with
augmentation, forwarding every image through the frozen backbone every epoch. selfsup-eval
extracts features once and fits the probe on them. Both on the same exported backbone and shards;
prints time and top-1 of each. Defaults are small enough for a 2-core CPU; the classic probe's
time is measured over --epochs-measured epochs and extrapolated to 90.

    python bench/linear.py CHECKPOINT --train SHARDS --val SHARDS [--limit 10000]
"""

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from selfsup.shards import resolve_shards
from selfsup_eval.checkpoint import load_backbone
from selfsup_eval.features import extract, iter_samples, preprocess
from selfsup_eval.linear import linear_probe


def load_images(urls, size, limit):
    xs, ys = [], []
    for _, _, label, data in iter_samples(urls, {"corrupt": 0}):
        xs.append(preprocess(data, size))
        ys.append(label)
        if len(xs) == limit:
            break
    return torch.stack(xs), torch.tensor(ys)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("--train", required=True)
    p.add_argument("--val", required=True)
    p.add_argument("--limit", type=int, default=10000, help="train images used by both probes")
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("--epochs-measured", type=int, default=2)
    args = p.parse_args()
    bb = load_backbone(args.checkpoint)
    size = bb.meta["input_size"]
    mean = torch.tensor(bb.meta["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(bb.meta["std"]).view(1, -1, 1, 1)
    train_urls, val_urls = resolve_shards(args.train).urls, resolve_shards(args.val).urls

    t = time.perf_counter()
    ftr = extract(bb, train_urls)
    keep = slice(0, args.limit)
    fva = extract(bb, val_urls)
    cached = linear_probe(ftr["features"][keep], ftr["label"][keep], fva["features"], fva["label"])
    t_cached = time.perf_counter() - t  # includes extraction of the full train split

    xtr, ytr = load_images(train_urls, size, args.limit)
    xva, yva = load_images(val_urls, size, None)
    c = int(ytr.max()) + 1
    head = torch.nn.Linear(bb.meta["feature_dim"], c)
    torch.nn.init.normal_(head.weight, std=0.01)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs_measured)
    t = time.perf_counter()
    for _ in range(args.epochs_measured):
        for idx in torch.randperm(len(xtr)).split(256):
            x = xtr[idx].float() / 255
            flip = torch.rand(len(x)) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)  # augmentation: flip
            with torch.no_grad():
                f = bb.features((x - mean) / std)
            loss = F.cross_entropy(head(f), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    t_epoch = (time.perf_counter() - t) / args.epochs_measured
    with torch.no_grad():
        pred = torch.cat([head(bb.features((xva[i:i + 512].float() / 255 - mean) / std)).argmax(1)
                          for i in range(0, len(xva), 512)])
    sgd_top1 = (pred == yva).float().mean().item()
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads; checkpoint {args.checkpoint}")
    print(f"train images: {len(xtr)}, val images: {len(xva)}")
    print(f"cached-feature probe: {t_cached:8.1f} s (incl. extraction)  top-1 {cached['top1']:.4f}")
    print(f"SGD probe, {args.epochs_measured} epochs measured: {t_epoch:.1f} s/epoch, top-1 after "
          f"{args.epochs_measured} epochs {sgd_top1:.4f}")
    print(f"SGD probe, {args.epochs} epochs (extrapolated): {t_epoch * args.epochs:8.1f} s")
    print(f"speed-up: {t_epoch * args.epochs / t_cached:.1f}x")


if __name__ == "__main__":
    main()
