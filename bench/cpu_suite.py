"""The CPU transfer suite's data: six small 28 px grayscale tasks, written as shards by selfsup-shards.

``python bench/cpu_suite.py [--out data/suite] [--fmnist DIR]`` writes ``OUT/TASK/{train,test}.json``
for the tasks that ``suites/cpu.yaml`` names (``make suite`` runs it, then judges the demo's
backbone against raw pixels). Nothing is downloaded; everything is seeded, so every machine writes
the same images.

* **natural-like**: ``fmnist`` (2,000 train / 2,000 test images drawn from Fashion-MNIST's own
  splits, the Debian package dataset-fashion-mnist; the demo backbone was pretrained on the train
  split's images without labels, so this task measures in-domain linear separability) and
  ``digits`` (scikit-learn's 1,797 8×8 handwritten digits, upscaled to 28 px: 1,197 train / 600
  test; a domain the demo never saw);
* **structured**, in the spirit of VTAB's CLEVR and dSprites tasks, drawn here on noise:
  ``count`` (1–6 discs and squares of random size and brightness: how many? CLEVR count),
  ``position`` (one shape: which of 7 columns, 4 px each, holds its centre? dSprites location),
  ``orientation`` (one bar of random length through a random point: its angle in 8 bins over
  180°, dSprites orientation) and ``distance`` (two discs: their centre distance in 5 bins of 4 px from 6 to 26 px,
  CLEVR distance's 2-D cousin); 1,500 train / 1,000 test each.

With ``n_train`` 1,000 per task (800 + 200, as VTAB-1k) ``selfsup-eval suite`` with the frozen
protocols took about 30 s per checkpoint (extraction and probes, 6 tasks) on a shared 2-core CPU;
writing the data takes about as long.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

SIZE = 28
GENERATED = {"count": 6, "position": 7, "orientation": 8, "distance": 5}
N_GEN = (1500, 1000)
FMNIST = (2000, 2000)
YY, XX = np.mgrid[:SIZE, :SIZE].astype(np.float32)


def _canvas(rng) -> np.ndarray:
    return rng.normal(25, 12, (SIZE, SIZE)).astype(np.float32)


def _shape(img, rng, cy, cx, r, kind=None):
    """A disc or a square of half-size ``r`` at (cy, cx), random brightness."""
    kind = kind or rng.choice(["disc", "square"])
    mask = ((YY - cy) ** 2 + (XX - cx) ** 2 <= r * r) if kind == "disc" else \
        (np.abs(YY - cy) <= r) & (np.abs(XX - cx) <= r)
    img[mask] = rng.uniform(150, 255)


def count_item(rng):
    n = int(rng.integers(1, 7))
    img, placed = _canvas(rng), []
    while len(placed) < n:  # non-overlapping, fully inside
        r = float(rng.uniform(1.5, 3.0))
        cy, cx = rng.uniform(r + 1, SIZE - r - 2, 2)
        if all((cy - y) ** 2 + (cx - x) ** 2 > (r + q + 1.5) ** 2 for y, x, q in placed):
            placed.append((cy, cx, r))
            _shape(img, rng, cy, cx, r)
    return img, n - 1


def position_item(rng):
    img = _canvas(rng)
    col = int(rng.integers(7))  # the label first: balanced classes
    r = float(rng.uniform(2, 3.5))
    cx = float(np.clip(rng.uniform(4 * col, 4 * col + 4), r, SIZE - 1 - r))
    cy = float(rng.uniform(r, SIZE - 1 - r))
    _shape(img, rng, cy, cx, r)
    return img, col


def orientation_item(rng):
    img = _canvas(rng)
    angle = float(rng.uniform(0, np.pi))
    length, width = float(rng.uniform(7, 11)), float(rng.uniform(1.0, 1.8))
    cy, cx = rng.uniform(10, SIZE - 11, 2)
    along = (XX - cx) * np.cos(angle) - (YY - cy) * np.sin(angle)
    across = (XX - cx) * np.sin(angle) + (YY - cy) * np.cos(angle)
    img[(np.abs(along) <= length) & (np.abs(across) <= width)] = rng.uniform(150, 255)
    return img, min(7, int(angle / np.pi * 8))


def distance_item(rng):
    img = _canvas(rng)
    r, label = 2.0, int(rng.integers(5))  # the label first: balanced classes
    d = float(rng.uniform(6 + 4 * label, 10 + 4 * label))  # bins [6, 10), [10, 14), ... [22, 26) px
    while True:  # a placement with both discs inside
        y1, x1 = rng.uniform(r + 1, SIZE - r - 2, 2)
        a = float(rng.uniform(0, 2 * np.pi))
        y2, x2 = y1 + d * np.sin(a), x1 + d * np.cos(a)
        if r + 1 <= y2 <= SIZE - r - 2 and r + 1 <= x2 <= SIZE - r - 2:
            break
    _shape(img, rng, y1, x1, r, "disc")
    _shape(img, rng, y2, x2, r, "disc")
    return img, label


ITEMS = {"count": count_item, "position": position_item, "orientation": orientation_item, "distance": distance_item}


def generated(task: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, list(ITEMS).index(task)])
    imgs, labels = zip(*(ITEMS[task](rng) for _ in range(n)))
    return np.clip(np.stack(imgs), 0, 255).astype(np.uint8), np.array(labels, dtype=np.int64)


def digits() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.stack([np.asarray(Image.fromarray((im * 255 / 16).astype(np.uint8)).resize((SIZE, SIZE), Image.BILINEAR))
                     for im in d.images])
    perm = np.random.default_rng(7).permutation(len(imgs))
    tr, te = perm[:1197], perm[1197:]
    return (imgs[tr], d.target[tr]), (imgs[te], d.target[te])


def fmnist(root: Path):
    from selfsup.shard_writer import _read_idx

    out = []
    for subset, n, seed in (("train", FMNIST[0], 11), ("test", FMNIST[1], 12)):
        arrays = _read_idx(root, "FashionMNIST", subset)
        if arrays is None:
            raise SystemExit(f"cpu_suite: no Fashion-MNIST idx files in {root} (install the Debian package "
                             "dataset-fashion-mnist or pass --fmnist DIR)")
        images, labels = arrays
        pick = np.sort(np.random.default_rng(seed).permutation(len(images))[:n])
        out.append((images[pick], labels[pick].astype(np.int64)))
    return out


def write(out: Path, task: str, split: str, images, labels) -> None:
    from selfsup.shard_writer import main as shards_main

    folder = out / task
    folder.mkdir(parents=True, exist_ok=True)
    npz = folder / f"{split}-source.npz"
    np.savez(npz, images=images, labels=labels)
    if shards_main([str(npz), str(folder), "--split", split, "--shard-size", "5000"]) != 0:
        raise SystemExit(f"cpu_suite: writing {folder}/{split} failed")
    npz.unlink()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/suite", help="where suites/cpu.yaml expects the tasks")
    p.add_argument("--fmnist", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST idx folder")
    p.add_argument("--tasks", nargs="+", default=None, help="only these tasks (default: all six)")
    args = p.parse_args(argv)
    out = Path(args.out)
    tasks = args.tasks or ["fmnist", "digits", *GENERATED]
    for task in tasks:
        print(f"cpu_suite: {task}", flush=True)
        if task == "fmnist":
            (a, b), (c, d) = fmnist(Path(args.fmnist))
        elif task == "digits":
            (a, b), (c, d) = digits()
        elif task in GENERATED:
            (a, b), (c, d) = generated(task, N_GEN[0], 0), generated(task, N_GEN[1], 1)
        else:
            p.error(f"unknown task {task}")
        write(out, task, "train", a, b)
        write(out, task, "test", c, d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
