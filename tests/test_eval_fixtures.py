"""Helpers for the ``test_eval_*`` modules (no tests here): exports and shards made in the test,
written from the public formats only (docs/formats.md), so selfsup_eval is tested against the
contract rather than against the trainer's own writer."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def export(path: Path, name: str = "resnet10t", kwargs: dict | None = None, small_stem: bool = False,
           pool: str = "head", size: int = 16, step: int = 1, seed: int = 0, in_chans: int = 3,
           objective: str = "simclr") -> Path:
    """A randomly initialised timm backbone in the exported-backbone layout, with non-trivial
    BatchNorm running statistics (so that eval vs train mode makes a difference)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model_kwargs = {**(kwargs or {}), "num_classes": 0, "in_chans": in_chans}
    model = timm.create_model(name, pretrained=False, **model_kwargs)
    if small_stem:
        model.conv1 = torch.nn.Conv2d(in_chans, model.bn1.num_features, 3, 1, 1, bias=False)
        model.maxpool = torch.nn.Identity()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    meta = {"format": 1, "model_name": name, "model_kwargs": model_kwargs, "small_stem": small_stem,
            "input_size": size, "mean": [0.5] * in_chans, "std": [0.25] * in_chans,
            "feature_dim": model.num_features, "pool": pool,
            "objective": objective, "step": step, "epoch": step / 10, "run": str(path)}
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"selfsup": json.dumps(meta)})
    return path


def export_step(run: Path, step: int, **kw) -> Path:
    return export(run / "export" / f"backbone-step{step:09d}.safetensors", step=step, **kw)


def images(n: int, size: int = 16, classes: int = 3, seed: int = 0, gray: bool = False):
    """Class-dependent pictures: a bright square whose colour and corner depend on the class, on
    dim noise; pixel-space k-NN separates them, so accuracies have a known ballpark."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    out = rng.integers(0, 50, size=(n, size, size, 3), dtype=np.int64)
    half = size // 2
    for i, c in enumerate(labels):
        y0, x0 = (c % 2) * half, ((c // 2) % 2) * half
        out[i, y0:y0 + half, x0:x0 + half] = [200 if (c >> b) & 1 else 90 for b in range(3)]
    out = out.astype(np.uint8)
    return (out.mean(-1).astype(np.uint8) if gray else out), labels


def write_split(out: Path, split: str, n: int, shard_size: int = 16, size: int = 16, classes: int = 3,
                seed: int = 0, labels: bool = True, gray: bool = False) -> Path:
    """Shards + index written by the project's ``selfsup-shards`` (selfsup.shard_writer.main)."""
    from selfsup.shard_writer import main as shards_main

    out.mkdir(parents=True, exist_ok=True)
    imgs, ys = images(n, size, classes, seed, gray)
    arrays = {"images": imgs}
    if labels:
        arrays.update(labels=ys, class_names=np.array([f"class{c}" for c in range(classes)]))
    npz = out / f"{split}-source.npz"
    np.savez(npz, **arrays)
    assert shards_main([str(npz), str(out), "--split", split, "--shard-size", str(shard_size)]) == 0
    return out / f"{split}.json"


def png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict]) -> Path:
    """A shard written member by member (webdataset.TarWriter), for damaged samples."""
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f, wds.TarWriter(f, encoder=False) as w:
        for s in samples:
            w.write(s)
    return path


def clustered(n: int, d: int = 16, c: int = 5, seed: int = 0, spread: float = 1.5):
    """Gaussian mixture: fixed centres, fresh samples per seed."""
    centres = torch.randn(c, d, generator=torch.Generator().manual_seed(1234)) * spread
    y = torch.arange(n) % c
    return centres[y] + torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), y


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "ssl"), str(ROOT / "eval"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
