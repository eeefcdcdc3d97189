"""Two processes (torchrun, gloo) give the gradients of one process on the same global batch."""

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
