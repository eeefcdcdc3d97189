"""Exact, elastic epochs end to end: the keys each process consumed (data.record_keys) are every
sample of the index once per epoch, minus the reported remainder, also across a resume with
another number of processes or workers, which keeps the global batch and so the lr."""

import json
import math
import shutil
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import pytest

from conftest import ROOT, child_env, torchrun_cmd, write_shards
from selfsup.cli import train_main
from selfsup.config import RecipeError

TINY = str(ROOT / "recipes" / "tiny.yaml")
SCRIPT = str(ROOT / "tests" / "scripts" / "train.py")
# 100 samples in shards of 20; global batch 12 (2 processes x 6): 8 steps an epoch, 4 left out
COMMON = ["train.batch_size=6", "train.epochs=1", "data.record_keys=true", "checkpoint.every_steps=3",
          "checkpoint.keep=5", "data.shuffle_buffer=8"]


def index_keys(index) -> set:
    import tarfile

    keys = set()
    for shard in json.loads(index.read_text())["shards"]:
        with tarfile.open(index.parent / shard["name"]) as tar:
            keys |= {m.name.split(".")[0] for m in tar.getmembers()}
    return keys


def seen(run, epoch=0) -> Counter:
    return Counter(k for f in sorted((run / "seen" / f"epoch-{epoch}").glob("rank-*.txt"))
                   for k in f.read_text().split())


def records(run) -> dict:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def torchrun(n, *args):
    r = subprocess.run(torchrun_cmd(n, SCRIPT, TINY, *args), env=child_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """One epoch on 2 processes x 2 workers (gloo), checkpoints at steps 3 and 6."""
    tmp = tmp_path_factory.mktemp("elastic")
    index = write_shards(tmp / "s", n=100, shard_size=20)
    run = tmp / "full"
    log = torchrun(2, f"data.train={index}", f"run.dir={run}", "data.num_workers=2", *COMMON)
    return SimpleNamespace(index=index, run=run, log=log, keys=index_keys(index))


def test_one_process_three_workers_uses_every_sample_once(tmp_path, capsys):
    index = write_shards(tmp_path / "s", n=70, shard_size=16)  # 16, 16, 16, 16, 6
    run = tmp_path / "run"
    assert train_main([TINY, f"data.train={index}", f"run.dir={run}", "data.num_workers=3",
                       "train.batch_size=8", "train.epochs=2", "data.record_keys=true",
                       "data.shuffle_buffer=8"]) == 0
    assert "the last 6 of each epoch's order" in capsys.readouterr().out
    keys = index_keys(index)
    for epoch in (0, 1):
        got = seen(run, epoch)
        assert sum(got.values()) == 64 and set(got.values()) == {1} and set(got) <= keys
    assert seen(run, 0) != seen(run, 1)  # a different remainder left out each epoch
    order0 = (run / "seen" / "epoch-0" / "rank-0.txt").read_text().split()
    assert order0 != sorted(order0)  # shuffled
    # a new run (resume=none) in the same run.dir starts its records afresh
    assert train_main([TINY, f"data.train={index}", f"run.dir={run}", "data.num_workers=0",
                       "train.batch_size=8", "train.max_steps=2", "data.record_keys=true",
                       "resume=none"]) == 0
    assert sum(seen(run, 0).values()) == 16 and not (run / "seen" / "epoch-1").exists()


def test_two_processes_two_workers_use_every_sample_once(full):
    got = seen(full.run)
    assert sum(got.values()) == 96 and set(got.values()) == {1} and set(got) <= full.keys
    assert "the last 4 of each epoch's order" in full.log
    # DDP's argument in the name torch now expects: no FutureWarning per process
    assert "broadcast_buffers" not in full.log and "FutureWarning" not in full.log
    per_rank = [set((full.run / "seen" / "epoch-0" / f"rank-{r}.txt").read_text().split()) for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 48


def resume_from(full, tmp_path, step=3):
    """A new run dir holding the full run's checkpoint at ``step`` and its (longer) key records,
    which the resume must cut back to the checkpoint."""
    run = tmp_path / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    name = f"step-{step:09d}"
    shutil.copytree(full.run / "checkpoints" / name, run / "checkpoints" / name)
    shutil.copytree(full.run / "seen", run / "seen")
    return run


@pytest.mark.parametrize("procs,workers,layout", [
    (1, 2, "train.batch_size 12, train.grad_accum 1 keep the global batch of 12"),
    (3, 1, "train.batch_size 4, train.grad_accum 1 keep the global batch of 12"),
    (2, 3, None)])
def test_a_resume_on_another_layout_uses_each_key_once_with_the_same_global_batch(full, tmp_path, procs,
                                                                                  workers, layout):
    run = resume_from(full, tmp_path)
    args = [f"data.train={full.index}", f"run.dir={run}", f"data.num_workers={workers}", *COMMON]
    log = torchrun(procs, *args)
    if layout:
        assert layout in log
    assert "resume: epoch 0 goes on with 64 of its samples left" in log
    got = seen(run)
    assert sum(got.values()) == 96 and set(got.values()) == {1} and set(got) <= full.keys
    a, b = records(full.run), records(run)
    assert sorted(b) == [4, 5, 6, 7, 8]
    for step in b:  # the same global batch: the same lr at every step; the loss goes on
        assert b[step]["lr"] == pytest.approx(a[step]["lr"], rel=1e-9)
        assert abs(b[step]["loss"] - a[step]["loss"]) < 0.25 * a[step]["loss"]
    assert b[8]["epoch"] == 1.0


def test_same_layout_resume_cuts_the_key_records_back_and_repeats_the_batches(full, tmp_path):
    run = resume_from(full, tmp_path, step=6)
    log = torchrun(2, f"data.train={full.index}", f"run.dir={run}", "data.num_workers=2", *COMMON)
    assert "goes on with" not in log  # the same layout: the stored positions are used as they are
    for r in (0, 1):
        name = f"seen/epoch-0/rank-{r}.txt"
        assert (run / name).read_text() == (full.run / name).read_text()
    a, b = records(full.run), records(run)
    assert [b[s]["loss"] for s in (7, 8)] == [a[s]["loss"] for s in (7, 8)]


def test_a_global_batch_that_does_not_split_is_refused_unless_accepted(full, tmp_path, capsys):
    run = resume_from(full, tmp_path)
    cfg = SimpleNamespace(resume="auto", train=SimpleNamespace(batch_size=6, grad_accum=1))
    from selfsup.elastic import batch_layout

    with pytest.raises(RecipeError, match=r"cannot keep the global batch of 12 \(2 processes x 6 x 1\) "
                       r"on 5 processes; process counts that keep it: 1, 2, 3, 4, 6, 12;"):
        batch_layout(cfg, 5, run, accept=False)
    assert batch_layout(cfg, 5, run, accept=True)[:2] == (6, 1)
    assert batch_layout(cfg, 4, run, accept=False)[:2] == (3, 1)
    cfg.train.grad_accum = 2  # less memory per process: the batch follows the accumulation
    assert batch_layout(cfg, 1, run, accept=True)[:2] == (6, 2)
    cfg.train.grad_accum = 5  # does not divide: the accumulation closest to it that does
    assert batch_layout(cfg, 3, run, accept=True)[:2] == (1, 4)
    # accepted end to end (1 process, a per-process batch of 4): the lr follows the linear rule
    args = [TINY, f"data.train={full.index}", f"run.dir={run}", "data.num_workers=0", *COMMON,
            "train.batch_size=4", "--accept-changes"]
    assert train_main(args) == 0
    out = capsys.readouterr().out
    assert "train.batch_size: 6 -> 4" in out
    # 25 steps an epoch now (100 // 4), so step 4 is 3 of a cosine over 25 steps, from 1e-3 x 4/256
    assert records(run)[4]["lr"] == pytest.approx(1e-3 * 4 / 256 * 0.5 * (1 + math.cos(math.pi * 3 / 25)))
    assert records(full.run)[4]["lr"] == pytest.approx(1e-3 * 12 / 256 * 0.5 * (1 + math.cos(math.pi * 3 / 8)))
    # epoch 0 still has each key once: 36 before, then the 64 left make 16 steps of 4, the
    # remainder of the old layout included
    got = seen(run)
    assert sum(got.values()) == 100 and set(got.values()) == {1} and set(got) == full.keys
    assert records(run)[19]["epoch"] == 1.0
