"""Two processes (torchrun, gloo) give the gradients of one process on the same global batch."""

import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, child_env, torchrun_cmd

SCRIPT = str(ROOT / "tests" / "scripts" / "grad_check.py")
TINY = str(ROOT / "recipes" / "tiny.yaml")


@pytest.mark.parametrize("loss", ["infonce", "dcl"])
def test_two_processes_match_one_process_gradients(tmp_path, loss):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    env = child_env()
    subprocess.run([sys.executable, SCRIPT, TINY, str(one), loss], env=env, check=True,
                   capture_output=True, timeout=300)
    r = subprocess.run(torchrun_cmd(2, SCRIPT, TINY, str(two), loss), env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    g1, g2 = torch.load(one), torch.load(two)
    assert g1.keys() == g2.keys() and len(g1) > 10
    worst = max((g1[k] - g2[k]).abs().max().item() for k in g1)
    assert worst <= 1e-6, worst
    # the comparison has teeth: without gathering, the two-process gradient would differ
    assert max(g1[k].abs().max().item() for k in g1) > 1e-3


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """Forward pass 3 of rank 1 returns NaN; logging every 10 steps leaves it to the weight check
    before the step-4 checkpoint, which every rank must make alike (no rank hangs in the save)."""
    from conftest import write_shards

    shards = write_shards(tmp_path / "s", n=64, shard_size=16)
    run = tmp_path / "run"
    r = subprocess.run(torchrun_cmd(2, str(ROOT / "tests" / "scripts" / "nan_check.py"), "3", TINY,
                                    f"data.train={shards}", f"run.dir={run}", "train.batch_size=8",
                                    "train.max_steps=8", "checkpoint.every_steps=2",
                                    "checkpoint.keep=5", "train.log_every=10"),
                       env=child_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    # two processes share the pipe: their lines may run together
    assert sorted(re.findall(r"rank \d: exit \d+ after \d+ forward passes", r.stdout)) == [
        "rank 0: exit 3 after 4 forward passes", "rank 1: exit 3 after 4 forward passes"], r.stderr[-3000:]
    assert r.stderr.count("selfsup-train: error: training diverged: weight ") == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000000002"]
