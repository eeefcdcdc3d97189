"""Short runs of a real recipe on tiny data (recipes/tiny.yaml's settings as overrides, because
tiny.yaml itself would switch the objective back to simclr), then k-NN on the export."""

from __future__ import annotations

import atexit
import functools
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from conftest import ROOT, child_env, torchrun_cmd, write_shards

TINY = ["data.num_workers=0", "data.shuffle_buffer=64", "augment.size=16",
        "augment.scale=[0.5,1.0]", "augment.blur_p=0.0", "model.name=test_resnet",
        "model.channels_last=false", "optim.name=adamw", "optim.lr=1e-2", "optim.weight_decay=1e-4",
        "optim.warmup_epochs=0", "train.batch_size=16", "train.precision=fp32", "train.log_every=1",
        "checkpoint.every_steps=0", "objective.proj_hidden_dim=64", "objective.proj_dim=32"]
# ...for objectives without a projection head (I-JEPA): the same minus the head sizes
TINY_NO_HEAD = [o for o in TINY if not o.startswith("objective.proj_")]
# the queue holds 4 steps of keys; BatchNorm in 2 groups of 8 (moco.yaml's 8 splits would leave
# groups of 2 at batch 16, where BatchNorm turns a 1x1 feature map into ±1: nothing is learnt)
MOCO = ["objective.queue_size=64", "objective.momentum=0.9", "objective.bn_splits=2"]


def train(recipe: str, shards, run_dir: Path, *overrides: str, tiny=TINY) -> int:
    from selfsup.cli import train_main

    return train_main([str(ROOT / "recipes" / recipe), f"data.train={shards}", f"run.dir={run_dir}",
                       *tiny, *overrides])


def losses(run_dir: Path) -> list[float]:
    """The training steps' losses (the online monitor's records carry none)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def run_recipe_and_evaluate(tmp_path: Path, recipe: str, *overrides: str, skip: int = 0,
                            epochs: int = 15, window: int = 8, tiny=TINY):
    """Train ``recipe`` for ``epochs`` epochs of 64 images (4 steps each); assert a finite loss
    that falls (mean of the last ``window`` steps below that of the first ``window`` after
    ``skip``: MoCo's loss first *rises* while real keys replace the random queue); evaluate the
    export with selfsup-eval's k-NN on held-out shards. Returns (losses, k-NN top-1)."""
    from selfsup_eval.cli import main as eval_main

    shards = write_shards(tmp_path / "s", n=64, split="train", shard_size=32)
    val = write_shards(tmp_path / "s", n=32, split="val", shard_size=32, seed=1)
    run = tmp_path / "run"
    assert train(recipe, shards, run, f"train.epochs={epochs}", *overrides, tiny=tiny) == 0
    curve = losses(run)
    assert len(curve) == 4 * epochs and all(math.isfinite(x) for x in curve)
    first, last = curve[skip:skip + window], curve[-window:]
    assert sum(last) / window < sum(first) / window - 0.05, curve
    out = tmp_path / "eval"
    rc = eval_main(["knn", str(run / "export" / "backbone.safetensors"), "--train", str(shards),
                    "--val", str(val), "--k", "5", "--no-cache", "--out", str(out)])
    assert rc == 0
    record = json.loads((out / "results.json").read_text())[0]
    assert record["step"] == 4 * epochs and record["train_samples"] == 64 and record["val_samples"] == 32
    return curve, record["knn"]["k=5"]


@functools.lru_cache(maxsize=None)
def queue_check_one_and_two_processes():
    """tests/scripts/queue_check.py with 1 and with 2 processes (torchrun, gloo), once per pytest
    session: test_moco and test_hallucinator both read it."""
    tmp = Path(tempfile.mkdtemp(prefix="queue_check"))
    atexit.register(shutil.rmtree, tmp, True)
    return one_and_two_processes("queue_check.py", tmp)


def one_and_two_processes(script: str, out: Path):
    """tests/scripts/SCRIPT on recipes/tiny.yaml with 1 process, then 2 (torchrun, gloo); each
    writes its results with torch.save. Returns (one, two)."""
    path, tiny, env = str(ROOT / "tests" / "scripts" / script), str(ROOT / "recipes" / "tiny.yaml"), child_env()
    r = subprocess.run([sys.executable, path, tiny, str(out / "one.pt")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(torchrun_cmd(2, path, tiny, str(out / "two.pt")), env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out / "one.pt"), torch.load(out / "two.pt")
