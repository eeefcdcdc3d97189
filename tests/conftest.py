"""Shared fixtures: tiny labelled shard sets made in the test (no downloads)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def make_images(n: int, size: int = 16, classes: int = 4, seed: int = 0, channels: int = 3):
    """Class-dependent images: each class a different coloured blob on noise, so that
    a learnt representation has something to find."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    yy, xx = np.mgrid[:size, :size]
    images = rng.integers(0, 60, size=(n, size, size, channels), dtype=np.int64)
    for i, c in enumerate(labels):
        cy, cx = rng.integers(size // 4, 3 * size // 4, size=2)
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < (size // 4 + c) ** 2
        colour = np.array([255 * ((c >> b) & 1) for b in range(channels)]) if channels == 3 else 255
        images[i][blob] = np.maximum(colour, 80) if channels == 3 else 200 - 30 * c
    return images.astype(np.uint8), labels.astype(np.int64)


def write_shards(out: Path, n: int = 64, split: str = "train", shard_size: int = 16,
                 size: int = 16, classes: int = 4, seed: int = 0) -> Path:
    """Shards written by selfsup-shards itself; returns the index json path."""
    from selfsup.shard_writer import main as shards_main

    images, labels = make_images(n, size, classes, seed)
    npz = out / f"{split}-src.npz"
    out.mkdir(parents=True, exist_ok=True)
    np.savez(npz, images=images, labels=labels,
             class_names=np.array([f"class{c}" for c in range(classes)]))
    rc = shards_main([str(npz), str(out), "--split", split, "--shard-size", str(shard_size)])
    assert rc in (0, None)
    return out / f"{split}.json"


@pytest.fixture
def shards(tmp_path):
    return write_shards(tmp_path / "shards")


def torchrun_cmd(nproc: int, script: str, *args: str, nnodes: int = 1) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", script, *args]


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "ssl"), str(ROOT / "eval"),
                                          env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def read_json(path: Path):
    return json.loads(Path(path).read_text())
