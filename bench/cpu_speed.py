"""How long will `make demo` train on this machine? Measures the two figures its time follows.

1. fp32 matrix-multiply speed (2048 x 2048, torch's threads): the machine's usable compute.
2. The demo recipe's training step (recipes/demo_fmnist.yaml: resnet10t at 28 px, batch 256,
   two views, DCL, AdamW) on synthetic views, augmentation included, in img/s.

Training time of the demo ≈ 150,000 images / (2). Two VMs of the same nominal kind gave 440 and
153 img/s (5.4 and ~17 min of training, bench/RESULTS.md): the time follows the CPU, not the
recipe. A real run prints the same estimate about a minute in (`estimate after ...`).

    .venv/bin/python bench/cpu_speed.py
"""

from __future__ import annotations

import platform
import time

import torch

from selfsup.config import load_recipe
from selfsup.build import build_model, make_accelerator

DEMO_IMAGES = 150_000  # 2.5 epochs of Fashion-MNIST's 60,000


def matmul_gflops(n: int = 2048, iters: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    return 2 * n ** 3 * iters / (time.perf_counter() - t) / 1e9


def demo_step_rate(steps: int = 5) -> float:
    cfg = load_recipe(["recipes/demo_fmnist.yaml"], ["train.cpu=true"])
    acc = make_accelerator(cfg)
    model = build_model(cfg, acc)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    b, s = cfg.train.batch_size, cfg.augment.size
    views = len(model.views())
    batch = {"image": torch.randint(0, 256, (b, views, 3, s, s), dtype=torch.uint8),
             "label": torch.zeros(b, dtype=torch.long)}
    gen = torch.Generator().manual_seed(0)

    def step():
        loss, _ = model(dict(batch), gen)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return b * steps / (time.perf_counter() - t)


def main() -> None:
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"fp32 matmul 2048^2     : {matmul_gflops():7.1f} GFLOP/s")
    rate = demo_step_rate()
    print(f"demo training step     : {rate:7.1f} img/s")
    print(f"make demo training     : about {DEMO_IMAGES / rate / 60:.1f} min "
          f"(+ ~1 min shards, ~1-2 min probes)")


if __name__ == "__main__":
    main()
