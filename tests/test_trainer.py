"""End-to-end trainer behaviour on tiny data: export format, metrics, exact resume, bad input."""

import json
import shutil
import warnings

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import ROOT, write_shards
from selfsup.cli import train_main

TINY = str(ROOT / "recipes" / "tiny.yaml")


def train(run_dir, shards, *overrides):
    return train_main([TINY, f"data.train={shards}", f"run.dir={run_dir}", *overrides])


def weights(run_dir):
    return load_file(str(run_dir / "export" / "backbone.safetensors"))


def test_tiny_run_exports_a_backbone_plain_timm_can_load(tmp_path, shards):
    run = tmp_path / "run"
    assert train(run, shards, "train.max_steps=3") == 0
    path = run / "export" / "backbone.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["selfsup"])
    assert meta["model_name"] == "test_resnet" and meta["step"] == 3
    assert meta["objective"] == "simclr" and meta["pool"] == "head" and meta["input_size"] == 16
    assert meta["feature_dim"] == 96 and len(meta["mean"]) == 3 and meta["format"] == 1
    model = timm.create_model(meta["model_name"], pretrained=False, **meta["model_kwargs"])
    model.load_state_dict(load_file(str(path)))  # strict: no missing or extra keys
    assert model.eval()(torch.zeros(2, 3, 16, 16)).shape == (2, 96)
    assert (run / "export" / "backbone-step000000003.safetensors").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {"loss", "lr", "img_per_s", "data_wait", "epoch", "corrupt_samples"} <= set(records[0])
    assert (run / "recipe.yaml").read_text().count("test_resnet") == 1
    # the lr follows the linear-scaling rule (1e-3 per 256 → 16/256 of it), then a cosine over 3 steps
    base = 1e-3 * 16 / 256
    assert [r["lr"] for r in records] == pytest.approx([base, base * 0.75, base * 0.25], rel=1e-6)


def test_loss_falls_on_learnable_data(tmp_path):
    index = write_shards(tmp_path / "s", n=128, shard_size=32)
    run = tmp_path / "run"
    assert train(run, index, "train.epochs=6", "train.batch_size=32", "optim.lr=1e-2") == 0
    losses = [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.1


@pytest.mark.parametrize("workers,accum", [(0, 1), (2, 2)])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, shards, workers, accum):
    common = ["train.max_steps=6", f"data.num_workers={workers}", f"train.grad_accum={accum}",
              "checkpoint.every_steps=3", "checkpoint.keep=5", "augment.blur_p=0.5"]
    full = tmp_path / "full"
    assert train(full, shards, *common) == 0
    half = tmp_path / "half"
    (half / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-000000003", half / "checkpoints" / "step-000000003")
    assert train(half, shards, *common, "resume=auto") == 0
    a, b = weights(full), weights(half)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # and a run that does not resume from step 3 ends elsewhere (the test can fail)
    other = tmp_path / "other"
    assert train(other, shards, *common, "run.seed=1") == 0
    assert any(not torch.equal(a[k], weights(other)[k]) for k in a)


def test_resume_auto_ignores_half_written_checkpoints(tmp_path, shards):
    run = tmp_path / "run"
    assert train(run, shards, "train.max_steps=2", "checkpoint.every_steps=1", "checkpoint.keep=1") == 0
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-000000002"]  # keep=1 pruned step 1
    (run / "checkpoints" / ".tmp-step-000000003").mkdir()  # a write killed half-way
    assert train(run, shards, "train.max_steps=3", "--accept-changes") == 0  # a longer run
    assert json.loads((run / "checkpoints" / "step-000000003" / "trainer.json").read_text())["step"] == 3


@pytest.mark.parametrize("args,message", [
    (["train.epochz=3"], "unknown recipe key 'train.epochz'"),
    (["objective.tempreature=0.2"], "unknown recipe key 'objective.tempreature'"),
    (["train.batch_size=many"], "train.batch_size"),
    (["objective.name=byol"], "unknown objective.name 'byol'"),
    (["model.name=resnet_9000"], "unknown timm model 'resnet_9000'"),
    (["resume=/nonexistent/ckpt"], "is not a selfsup checkpoint directory"),
])
def test_bad_recipe_input_is_one_clear_line(tmp_path, shards, capsys, args, message):
    assert train(tmp_path / "run", shards, *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("selfsup-train: error:") and message in err and "\n" not in err


@pytest.mark.parametrize("make_spec,message", [
    (lambda p: str(p / "missing"), "missing"),
    (lambda p: (p / "empty").mkdir() or str(p / "empty"), "empty"),
])
def test_bad_shard_paths_are_one_clear_line(tmp_path, capsys, make_spec, message):
    assert train(tmp_path / "run", make_spec(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("selfsup-train: error: data.train:") and message in err and "\n" not in err


@pytest.mark.parametrize("log_every,caught", [(1, "the loss of step 4 is nan"),
                                                (10, "weight backbone.")])
def test_a_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, shards, capsys,
                                                                 monkeypatch, log_every, caught):
    """A NaN loss in forward pass 4 (steps 1-3 fine) poisons the weights from step 4 on. Logging
    every step catches the loss at step 4; logging every 10 steps leaves it to the weight check of
    the step-4 checkpoint. Either way steps 1-3 are all that was written, the export is finite, and
    the user gets one line saying where to resume from."""
    from selfsup.objectives.simclr import SimCLR

    calls, forward = [], SimCLR.forward

    def poisoned(self, batch, generator):
        loss, metrics = forward(self, batch, generator)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 4 else loss), metrics

    monkeypatch.setattr(SimCLR, "forward", poisoned)
    run = tmp_path / "run"
    assert train(run, shards, "train.max_steps=8", "checkpoint.every_steps=2", "checkpoint.keep=5",
                 f"train.log_every={log_every}") == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("selfsup-train: error: training diverged: ") and caught in err
    assert "(resume=auto)" in err and str(run / "checkpoints" / "step-000000002") in err
    assert len(calls) == 4  # stopped at the step that showed it
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000000002"]
    with safe_open(str(run / "export" / "backbone.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["selfsup"])["step"] == 2
    assert all(torch.isfinite(w).all() for w in weights(run).values())
    logged = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == ([1, 2, 3] if log_every == 1 else [])


def test_online_monitor_logs_knn_and_collapse_indicators(tmp_path):
    from selfsup.monitor import collapse_metrics

    write_shards(tmp_path / "s", n=64, split="train", shard_size=32)
    write_shards(tmp_path / "s", n=24, split="val", shard_size=32, seed=1)
    run = tmp_path / "run"  # data.train=DIR with train.json + val.json: the train split is used
    assert train(run, tmp_path / "s", "train.max_steps=4", "monitor.every_steps=2",
                 f"data.val={tmp_path / 's'}", "monitor.k=5") == 0
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    mon = [r for r in records if "monitor/knn_top1" in r]
    assert [r["step"] for r in mon] == [2, 4]
    assert all(0 <= r["monitor/knn_top1"] <= 1 and r["monitor/rankme"] >= 1 for r in mon)
    # the indicators themselves: a collapsed (rank-1) set vs an isotropic one
    g = torch.Generator().manual_seed(0)
    collapsed = torch.randn(200, 1, generator=g) * torch.randn(1, 32, generator=g)
    spread = torch.randn(200, 32, generator=g)
    assert collapse_metrics(collapsed)["rankme"] == pytest.approx(1.0, abs=0.01)
    assert collapse_metrics(spread)["rankme"] > 25
    assert collapse_metrics(spread)["feature_std"] == pytest.approx(32 ** -0.5, rel=0.1)
    assert collapse_metrics(torch.ones(50, 32))["feature_std"] < 1e-6


@pytest.mark.parametrize("recipe,overrides,compiled", [
    ("simclr.yaml", ["model.name=test_resnet"], "forward"),
    ("moco.yaml", ["model.name=test_resnet", "objective.queue_size=4096"], "forward"),
    ("jigclu_small.yaml", ["model.name=test_resnet", "model.small_stem=true", "augment.size=16"],
     "forward_features"),
    ("ijepa_vit_tiny.yaml", ["model.name=test_vit", "model.kwargs.img_size=16", "model.kwargs.patch_size=2",
                             "model.kwargs.depth=1", "model.kwargs.embed_dim=32", "model.kwargs.num_heads=2",
                             "augment.size=16", "objective.pred_depth=1", "objective.pred_dim=16"], None),
])
def test_model_compile_compiles_the_backbone_method_the_objective_calls(recipe, overrides, compiled):
    """On the H200 `model.compile=true` changed nothing for I-JEPA (its masked encoder never calls
    the backbone's forward): compile what each objective calls; I-JEPA compiles its encoders and
    predictor around the loss (tests/test_compile.py runs it). Compilation itself is lazy, so
    nothing is compiled here."""
    from types import SimpleNamespace

    from selfsup.config import load_recipe
    from selfsup.build import build_model

    cfg = load_recipe(str(ROOT / "recipes" / recipe), [*overrides, "model.compile=true",
                                                       "model.channels_last=false"])
    acc = SimpleNamespace(num_processes=1, device=torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "has no effect" warning any more
        objective = build_model(cfg, acc)
    if compiled is None:
        assert hasattr(objective._compiled_loss, "_torchdynamo_orig_callable")
    nets = objective.backbones()
    assert len(nets) == (2 if recipe == "moco.yaml" else 1)  # MoCo's key encoder too
    for net in nets:
        assert (net._compiled_call_impl is not None) == (compiled == "forward")
        assert hasattr(net.forward_features, "_torchdynamo_orig_callable") == (compiled == "forward_features")
