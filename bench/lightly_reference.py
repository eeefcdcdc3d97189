"""Accuracy at equal budget: a plain lightly training loop vs selfsup, same model, loss and images.

The reference is what a lightly user writes (lightly's examples/pytorch/simclr.py): torchvision's
Fashion-MNIST dataset from the Debian idx files, lightly's ``SimCLRTransform`` in DataLoader
workers, timm ``resnet10t`` + lightly ``SimCLRProjectionHead`` (512-512-128, BN), lightly's
``DCLLoss`` (or ``NTXentLoss``), AdamW with the same warm-up + cosine schedule per step, fp32.
It then writes the backbone in selfsup's export format, so that ``selfsup-eval`` judges both with
the same code and protocol. The selfsup side is ``bench/methods.py``'s run of the same objective
at the same budget (``--images``, batch, seed); this script prints the reference's figures.

Augmentation is matched to ``recipes/data/fashion_mnist.yaml`` + the demo: crop scale 0.5-1 at
28 px, flip, colour jitter p=0.8 with brightness/contrast 0.4 (no saturation/hue: grey images),
no grayscale, no blur.

    python bench/lightly_reference.py [--loss dcl] [--images 30000] [--batch-size 256] [--seed 0]
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
from lightly.loss import DCLLoss, NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms import SimCLRTransform
from PIL import Image

from selfsup.checkpoint import export_backbone
from selfsup.schedules import lr_scheduler

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = [0.286] * 3, [0.353] * 3


class FashionMNIST(torch.utils.data.Dataset):
    """The idx files of the Debian package, as PIL images (what torchvision's class returns)."""

    def __init__(self, root: Path, transform):
        with gzip.open(root / "train-images-idx3-ubyte.gz") as f:
            self.images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i]).convert("RGB"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loss", default="dcl", choices=("dcl", "infonce"))
    p.add_argument("--images", type=int, default=30000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--fmnist", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    p.add_argument("--eval-train", default="data/fashion-mnist/train-{000000..000003}.tar")
    p.add_argument("--eval-val", default="data/fashion-mnist/test-000000.tar")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-lightly-reference")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    transform = SimCLRTransform(input_size=28, cj_prob=0.8, cj_bright=0.4, cj_contrast=0.4, cj_sat=0.0,
                                cj_hue=0.0, min_scale=0.5, random_gray_scale=0.0, gaussian_blur=0.0,
                                normalize={"mean": MEAN, "std": STD})
    data = FashionMNIST(args.fmnist, transform)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, persistent_workers=args.workers > 0)
    backbone = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    head = SimCLRProjectionHead(backbone.num_features, 512, 128)
    model = torch.nn.Sequential(backbone, head)
    loss_fn = (DCLLoss if args.loss == "dcl" else NTXentLoss)(temperature=0.2)
    steps = args.images // args.batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3 * args.batch_size / 256, weight_decay=1e-4)
    per_epoch = len(data) // args.batch_size
    sched = lr_scheduler(opt, steps, round(0.1 * per_epoch), 0.0, 0.0)
    step, t0 = 0, time.perf_counter()
    model.train()
    while step < steps:
        for v0, v1 in loader:
            sched.step_update(step)
            loss = loss_fn(model(v0), model(v1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % 20 == 0:
                print(f"step {step}/{steps} loss {loss.item():.4f}", flush=True)
            if step == steps:
                break
    train_s = time.perf_counter() - t0
    run = args.out / f"{args.loss}-b{args.batch_size}-s{args.seed}"
    meta = {"model_name": "resnet10t", "model_kwargs": {"num_classes": 0}, "small_stem": False,
            "input_size": 28, "mean": MEAN, "std": STD, "feature_dim": int(backbone.num_features),
            "pool": "head", "objective": f"lightly-{args.loss}", "step": steps, "epoch": steps / per_epoch,
            "run": str(run)}
    path = export_backbone(backbone, run, meta)
    subprocess.run([str(Path(sys.executable).parent / "selfsup-eval"), "all", str(path), "--train",
                    args.eval_train, "--val", args.eval_val, "--k", "20", "--out", str(run / "eval")],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    rec = json.loads((run / "eval" / "results.json").read_text())[-1]
    print(json.dumps({"reference": f"lightly {args.loss}", "seed": args.seed, "batch": args.batch_size,
                      "images": steps * args.batch_size, "knn20": rec["knn"]["k=20"],
                      "linear": rec["linear"]["top1"], "train_s": round(train_s, 1)}))


if __name__ == "__main__":
    main()
