"""The CPU trainer's threads and a log without notices the user cannot act on (issue 31)."""

import logging

import pytest
import torch

from conftest import ROOT
from selfsup import threads
from selfsup.cli import train_main
from selfsup.config import RecipeError


def test_threads_share_the_cores_among_local_processes_and_env_overrides(monkeypatch):
    assert threads.auto_threads(16, 1, 4) == 16  # workers are not subtracted (measured: slower)
    assert threads.auto_threads(16, 2, 4) == 8  # 8 cores per process
    assert threads.auto_threads(2, 3, 1) == 1  # never below one
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert threads.choose(1)[0] == 4  # 8 cores, 2 processes here
    monkeypatch.setenv("OMP_NUM_THREADS", "5")  # the user's (or torchrun's) choice is kept
    assert threads.choose(1) is None
    monkeypatch.setenv(threads.ENV, "2")  # ...unless ours says otherwise
    assert threads.choose(1) == (2, threads.ENV)
    monkeypatch.setenv(threads.ENV, "0")
    with pytest.raises(RecipeError, match="SELFSUP_CPU_THREADS='0' must be a whole number >= 1"):
        threads.choose(1)


def test_a_run_sets_its_threads_and_says_why_the_peak_lr_is_not_reached(tmp_path, shards, monkeypatch,
                                                                         capsys, caplog):
    monkeypatch.setenv(threads.ENV, "1")
    # the run writes OMP_NUM_THREADS into os.environ; set through monkeypatch (empty: unset for
    # selfsup), it is restored afterwards, so later tests' subprocesses do not inherit 1 thread
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.WARNING):
            assert train_main([str(ROOT / "recipes" / "tiny.yaml"), f"data.train={shards}",
                               f"run.dir={tmp_path / 'run'}", "train.max_steps=2",
                               "optim.warmup_epochs=5"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr()
    assert "cpu: 1 torch thread(s) per process (SELFSUP_CPU_THREADS)" in out.out
    assert "optim.warmup_epochs=5 (20 steps) covers the whole run of 2 steps: the peak lr" in out.err
    assert not [r for r in caplog.records if "will have no effect" in r.getMessage()]
