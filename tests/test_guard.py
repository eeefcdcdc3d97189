"""The guard (selfsup.guard): the start measured at step 0, monitor/knn_vs_init,
checkpoint.keep_best through a resume, and monitor.min_vs_init stopping a run that got worse with
exit status 3 and its best export intact. The monitor's k-NN is forced (a scripted sequence) so
that the assertions are about the guard's decisions, not about what a few steps learn."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import write_shards
from tinyrun import train

KNN = "monitor/knn_top1"


def scripted(monkeypatch, values: list[float]):
    """Monitor.run returns the next of ``values`` as its k-NN (the real collapse metrics aside)."""
    from selfsup.monitor import Monitor

    queue = list(values)

    def run(self, backbone):
        return {KNN: queue.pop(0), "monitor/feature_std": 0.1, "monitor/rankme": 2.0}
    monkeypatch.setattr(Monitor, "run", run)
    return queue


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def monitor_meta(path):
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["selfsup"])


@pytest.fixture
def data(tmp_path):
    train_shards = write_shards(tmp_path / "s", n=32, shard_size=32)
    val = write_shards(tmp_path / "s", n=16, split="val", shard_size=16, seed=1)
    return train_shards, [f"data.val={val}", "monitor.every_steps=1", "monitor.max_samples=16", "monitor.k=3"]


def test_keep_best_survives_pruning_and_a_resume(tmp_path, data, monkeypatch, capsys):
    shards, mon = data
    run = tmp_path / "run"
    common = [*mon, "checkpoint.keep_best=true", "checkpoint.every_steps=2", "checkpoint.keep=1"]
    scripted(monkeypatch, [0.50, 0.60, 0.70, 0.65, 0.64])  # steps 0..4: the best is step 2
    assert train("tiny.yaml", shards, run, *common, "train.max_steps=4") == 0
    best = run / "export" / "backbone-best.safetensors"
    meta = monitor_meta(best)
    assert meta["monitor"] == {"knn_top1": 0.70, "step": 2} and meta["step"] == 2
    ours, step2 = load_file(str(best)), load_file(str(run / "export" / "backbone-step000000002.safetensors"))
    assert ours.keys() == step2.keys() and all(torch.equal(ours[k], step2[k]) for k in ours)
    logged = {r["step"]: r for r in records(run) if KNN in r}
    assert sorted(logged) == [0, 1, 2, 3, 4]  # the start is measured once, at step 0
    assert "monitor/knn_vs_init" not in logged[0]
    assert logged[3]["monitor/knn_vs_init"] == pytest.approx(15.0)
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-")] == ["step-000000004"]
    state = json.loads((run / "checkpoints" / "step-000000004" / "trainer.json").read_text())["guard"]
    assert state["init_knn"] == 0.5 and state["best_step"] == 2
    # resumed: 0.68 is above the last evaluation but below the best: the best stays step 2's
    scripted(monkeypatch, [0.68, 0.90])
    assert train("tiny.yaml", shards, run, *common, "train.max_steps=5", "--accept-changes") == 0
    assert monitor_meta(best)["monitor"] == {"knn_top1": 0.70, "step": 2}
    logged = {r["step"]: r for r in records(run) if KNN in r}
    assert logged[5]["monitor/knn_vs_init"] == pytest.approx(18.0)  # still against the step-0 start
    scripted(monkeypatch, [0.90])
    assert train("tiny.yaml", shards, run, *common, "train.max_steps=6", "--accept-changes") == 0
    assert monitor_meta(best)["monitor"] == {"knn_top1": 0.90, "step": 6}


def test_min_vs_init_stops_with_exit_3_and_keeps_the_best(tmp_path, data, monkeypatch, capsys):
    shards, mon = data
    run = tmp_path / "run"
    # start 0.80; step 1 better (best); step 2 -10 points, step 3 back within 5; steps 4, 5 below
    scripted(monkeypatch, [0.80, 0.85, 0.70, 0.78, 0.60, 0.50, 0.9, 0.9])
    capsys.readouterr()
    rc = train("tiny.yaml", shards, run, *mon, "checkpoint.keep_best=true", "monitor.min_vs_init=-5",
               "train.max_steps=8")
    assert rc == 3
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("selfsup-train")]
    assert len(err) == 1 and "error:" in err[0] and "two evaluations in a row" in err[0], err
    assert "backbone-best.safetensors (step 1" in err[0]
    steps = [r["step"] for r in records(run) if "loss" in r]
    assert max(steps) == 5  # stopped at the second evaluation in a row below, not one later
    meta = monitor_meta(run / "export" / "backbone-best.safetensors")
    assert meta["monitor"] == {"knn_top1": 0.85, "step": 1}


def test_the_guard_keys_need_the_monitor(tmp_path, capsys):
    shards = write_shards(tmp_path / "s", n=32, shard_size=32)
    for key in ("checkpoint.keep_best=true", "monitor.min_vs_init=-5"):
        capsys.readouterr()
        assert train("tiny.yaml", shards, tmp_path / "run", key) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "monitor.every_steps must be > 0" in err[0], err
    assert train("tiny.yaml", shards, tmp_path / "run", "monitor.every_steps=1", "monitor.min_vs_init=5") == 2
    assert "monitor.min_vs_init must be < 0" in capsys.readouterr().err
