"""Linear-probe cost: ``selfsup-eval linear`` (cached features) vs the classic 90-epoch probe.

The classic protocol (MoCo's main_lincls, MAE's linear probe, ...) trains a linear classifier
for 90-100 epochs with augmentation, forwarding every training image through the frozen backbone
every epoch. ``selfsup-eval linear`` forwards every image once (no augmentation), then fits an
L-BFGS logistic regression on the cached features. Both start from the same shards (the first
``--train-size`` / ``--val-size`` samples, copied to temporary shards untimed) and the same
exported backbone; both times are wall-clock, end to end:

* cached: ``selfsup_eval.cli.main(["linear", CKPT, ...])`` in this process, cache off: checkpoint
  load and hash, decoding, one forward per image, the weight-decay sweep and the final fit (timm
  is imported before either side is timed: the classic side, second in the process, would
  otherwise get that one-time cost for free);
* classic: decode every image once (in its favour: a real data loader decodes every epoch), then
  ``--epochs`` epochs of batched RandomResizedCrop(scale 0.08-1) + horizontal flip, a frozen
  eval-mode forward, and an SGD step (momentum 0.9, lr 0.1 x batch/256, cosine, no weight decay)
  of a linear head behind a non-affine BatchNorm (MAE's probe head); then centre-crop val.

Defaults: the ``make demo`` backbone and Fashion-MNIST shards when present (a trained backbone, so
the accuracies mean something), else a synthetic set and a random resnet10t. Flags shrink it.

    python bench/linear.py [--checkpoint runs/demo/export/backbone.safetensors]
        [--train data/fashion-mnist/train.json --val data/fashion-mnist/test.json]
        [--train-size 5000 --val-size 2000 --epochs 90 --batch-size 256]
"""

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from selfsup_eval.checkpoint import load_backbone
from selfsup_eval.cli import main as eval_main
from selfsup_eval.data import decode, iter_samples

ROOT = Path(__file__).resolve().parents[1]
DEMO_CKPT = ROOT / "runs/demo/export/backbone.safetensors"
DEMO_TRAIN, DEMO_VAL = ROOT / "data/fashion-mnist/train.json", ROOT / "data/fashion-mnist/test.json"


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def subset(spec: str, n: int, out: Path, split: str) -> Path:
    """The first ``n`` samples of ``spec`` as one shard + index (raw bytes, no re-encoding)."""
    import webdataset as wds
    from selfsup_io.shards import resolve_shards

    shards = resolve_shards(spec)
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(out / f"{split}-000000.tar", "wb") as f, wds.TarWriter(f, encoder=False) as w:
        for s in iter_samples(shards.urls):
            w.write({"__key__": s.key, "png": s.data, "cls": str(s.label).encode()})
            count += 1
            if count == n:
                break
    index = {"format": "selfsup-shards/1", "split": split, "num_samples": count,
             "class_names": shards.class_names, "image_format": "png",
             "shards": [{"name": f"{split}-000000.tar", "num_samples": count}]}
    (out / f"{split}.json").write_text(json.dumps(index))
    return out / f"{split}.json"


def synthetic(root: Path):
    """Fashion-MNIST-like: 28 px grayscale, 10 classes of noisy shapes; random resnet10t export."""
    import timm
    from safetensors.torch import save_file
    from selfsup.shard_writer import main as shards_main

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:28, :28]
    for split, n in (("train", 12000), ("val", 4000)):
        labels = rng.integers(0, 10, n)
        imgs = rng.normal(40, 20, (n, 28, 28))
        for i, c in enumerate(labels):
            cy, cx = rng.normal(14, 2, 2)
            r = 4 + c % 5 + rng.normal(0, 1)
            shape = (np.abs(yy - cy) + np.abs(xx - cx) < r * 1.3) if c >= 5 else ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)
            imgs[i][shape] += 150
        np.savez(root / f"{split}.npz", images=imgs.clip(0, 255).astype(np.uint8), labels=labels)
        shards_main([str(root / f"{split}.npz"), str(root / "shards"), "--split", split])
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    meta = {"format": 1, "model_name": "resnet10t", "model_kwargs": {"num_classes": 0}, "small_stem": False,
            "input_size": 28, "mean": [0.2] * 3, "std": [0.3] * 3, "feature_dim": 512, "pool": "head",
            "objective": "random-init", "step": 0}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "random.safetensors"),
              metadata={"selfsup": json.dumps(meta)})
    return root / "random.safetensors", root / "shards/train.json", root / "shards/val.json"


def load(index: Path, size: int, channels: int):
    from selfsup_io.shards import resolve_shards

    xs, ys = [], []
    for s in iter_samples(resolve_shards(str(index)).urls):
        xs.append(decode(s.data, size, channels))
        ys.append(s.label)
    return torch.stack(xs), torch.tensor(ys)


def random_resized_crop_flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """torchvision's RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3)) + flip, batched with
    one affine grid per image (crops clipped to the image instead of torchvision's retries)."""
    n = len(x)
    area = torch.empty(n).uniform_(0.08, 1.0, generator=g)
    logr = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g)
    w = (area * logr.exp()).sqrt().clamp(max=1.0)
    h = (area / logr.exp()).sqrt().clamp(max=1.0)
    cx = (torch.rand(n, generator=g) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=g) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def classic_probe(ckpt: str, train: Path, val: Path, epochs: int, batch: int):
    t0 = time.perf_counter()
    bb = load_backbone(ckpt)
    size, c = bb.input_size, bb.in_chans
    xtr, ytr = load(train, size, c)
    xva, yva = load(val, size, c)
    mean = torch.tensor(bb.meta["mean"][:c]).view(1, -1, 1, 1)
    std = torch.tensor(bb.meta["std"][:c]).view(1, -1, 1, 1)
    classes = int(max(ytr.max(), yva.max())) + 1
    head = torch.nn.Sequential(torch.nn.BatchNorm1d(bb.meta["feature_dim"], affine=False),
                               torch.nn.Linear(bb.meta["feature_dim"], classes))
    torch.nn.init.normal_(head[1].weight, std=0.01)
    torch.nn.init.zeros_(head[1].bias)
    opt = torch.optim.SGD(head.parameters(), lr=0.1 * batch / 256, momentum=0.9, weight_decay=0.0)
    steps = epochs * math.ceil(len(xtr) / batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        head.train()
        for idx in torch.randperm(len(xtr), generator=g).split(batch):
            x = random_resized_crop_flip(xtr[idx].float() / 255, g)
            with torch.no_grad():
                f = bb.features((x - mean) / std)  # frozen, eval mode
            loss = F.cross_entropy(head(f), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if epoch == 0:
            print(f"  classic probe: epoch 1 took {time.perf_counter() - t0:.1f} s (incl. decoding)", flush=True)
    head.eval()
    with torch.no_grad():
        logits = torch.cat([head(bb.features((xb.float() / 255 - mean) / std)) for xb in xva.split(512)])
    top1 = (logits.argmax(1) == yva).float().mean().item()
    return time.perf_counter() - t0, top1


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--train", default=None)
    p.add_argument("--val", default=None)
    p.add_argument("--train-size", type=int, default=5000)
    p.add_argument("--val-size", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.checkpoint or args.train or args.val:
            ckpt, train, val, source = args.checkpoint, args.train, args.val, "given"
        elif DEMO_CKPT.is_file() and DEMO_TRAIN.is_file() and DEMO_VAL.is_file():
            ckpt, train, val, source = str(DEMO_CKPT), str(DEMO_TRAIN), str(DEMO_VAL), "make demo"
        else:
            ckpt, train, val = map(str, synthetic(tmp))
            source = "synthetic (random resnet10t)"
        sub_train = subset(train, args.train_size, tmp / "sub", "train")
        sub_val = subset(val, args.val_size, tmp / "sub", "val")
        n_train = json.loads(sub_train.read_text())["num_samples"]
        n_val = json.loads(sub_val.read_text())["num_samples"]
        print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
        print(f"backbone: {ckpt} ({source}); train {n_train} / val {n_val} images from {train}, {val}")

        import timm  # noqa: F401  one-time interpreter cost (2.6 s here), which the classic side
        # would otherwise skip by running second in this process: neither side is charged for it
        t = time.perf_counter()
        rc = eval_main(["linear", ckpt, "--train", str(sub_train), "--val", str(sub_val), "--no-cache",
                        "--out", str(tmp / "out")])
        t_cached = time.perf_counter() - t
        assert rc == 0
        cached = json.loads((tmp / "out/results.json").read_text())[0]["linear"]

        t_classic, classic_top1 = classic_probe(ckpt, sub_train, sub_val, args.epochs, args.batch_size)

    print(f"cached-feature probe (selfsup-eval linear): {t_cached:8.1f} s  top-1 {cached['top1']:.4f} "
          f"(wd {cached['wd']:g})")
    print(f"classic probe, {args.epochs} epochs, RRC+flip, SGD: {t_classic:8.1f} s  top-1 {classic_top1:.4f}")
    print(f"speed-up: {t_classic / t_cached:.1f}x")


if __name__ == "__main__":
    sys.exit(main())
