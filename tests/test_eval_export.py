"""selfsup-export: a selfsup training checkpoint directory and other frameworks' checkpoints become
selfsup exports, read back exactly (tensors and metadata) by selfsup-eval."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import write_shards
from selfsup_eval.checkpoint import load_backbone
from selfsup_eval.export_cli import main as export_main
from test_eval_foreign import IJEPA_KW, model, prefixed
from tinyrun import TINY, TINY_NO_HEAD, train

MOCO = ["objective.name=moco", "objective.queue_size=32", "objective.momentum=0.9"]
IJ = ["model.name=test_vit", "model.kwargs.img_size=16", "model.kwargs.patch_size=2",
      "model.kwargs.depth=1", "model.kwargs.embed_dim=32", "model.kwargs.num_heads=2",
      "objective.pred_depth=1", "objective.pred_dim=16", "objective.min_keep=4"]


def meta_of(path):
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["selfsup"])


@pytest.mark.parametrize("case", [("tiny.yaml", MOCO, TINY), ("ijepa_vit_tiny.yaml", IJ, TINY_NO_HEAD),
                                  ("ijepa_vit_tiny.yaml", [*IJ, "objective.export=context"], TINY_NO_HEAD)],
                         ids=["moco", "ijepa-target", "ijepa-context"])
def test_a_training_checkpoint_exports_exactly_as_the_trainer_did(tmp_path, capsys, case):
    """MoCo's checkpoint also holds the key encoder (backbone_key.): the query encoder must be
    the one exported; I-JEPA holds a context and a target encoder: the one objective.export names
    (encoder.vit. or target.vit.) must be, pooled mean_patch."""
    recipe, overrides, tiny = case
    shards = write_shards(tmp_path / "s", n=32, shard_size=32)
    run = tmp_path / "run"
    assert train(recipe, shards, run, *overrides, "train.max_steps=2", "checkpoint.every_steps=2",
                 "train.batch_size=8", tiny=tiny) == 0
    out = tmp_path / "exported.safetensors"
    assert export_main([str(run), str(out)]) == 0
    assert "every checkpoint tensor used" not in capsys.readouterr().out  # heads etc. are reported
    reference = run / "export" / "backbone-step000000002.safetensors"
    ours, theirs = load_file(str(out)), load_file(str(reference))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    mine, trainer = meta_of(out), meta_of(reference)
    for key in ("model_name", "model_kwargs", "small_stem", "input_size", "mean", "std", "pool",
                "objective", "step", "feature_dim"):
        assert mine[key] == trainer[key], key
    step_dir = run / "checkpoints" / "step-000000002"
    assert export_main([str(step_dir), str(tmp_path / "again.safetensors")]) == 0


def test_a_foreign_checkpoint_exports_to_the_features_of_its_weights(tmp_path, capsys):
    direct = model("vit_tiny_patch16_224", 0, **IJEPA_KW)
    src = tmp_path / "ijepa.pth.tar"
    torch.save({"encoder": prefixed(model("vit_tiny_patch16_224", 9, **IJEPA_KW).state_dict(), "module."),
                "target_encoder": prefixed(direct.state_dict(), "module."), "epoch": 300}, src)
    out = tmp_path / "ijepa.safetensors"
    kw = json.dumps(IJEPA_KW)
    assert export_main([str(src), str(out), "--model", "vit_tiny_patch16_224", "--model-kwargs", kw,
                        "--input-size", "16"]) == 0
    bb = load_backbone(str(out))
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(bb.features(x), direct(x))
    meta = meta_of(out)
    assert meta["source"]["checkpoint_key"] == "target_encoder" and meta["step"] == 300
    assert meta["mean"] == list(direct.pretrained_cfg["mean"]) and meta["feature_dim"] == 48


def test_a_checkpoint_exports_with_its_own_recipe_and_the_umask(tmp_path, monkeypatch):
    """A resume with --accept-changes rewrites RUN/recipe.yaml (here augment.mean): an older
    checkpoint is described by the recipe it was written with (step-N/recipe.yaml), as the
    trainer's export of that step was; the file is 0666 & ~umask, not safetensors' 0600."""
    import os

    from safetensors.torch import save_file

    def recipe(mean):
        return json.dumps({"model": {"name": "resnet10t", "kwargs": {}, "small_stem": False},
                           "augment": {"size": 32, "mean": mean, "std": [0.2, 0.2, 0.2]},
                           "objective": {"name": "simclr"}})
    run = tmp_path / "run"
    step = run / "checkpoints" / "step-000000002"
    step.mkdir(parents=True)
    (run / "recipe.yaml").write_text(recipe([0.5, 0.5, 0.5]))  # the run's current recipe
    (step / "recipe.yaml").write_text(recipe([0.1, 0.2, 0.3]))  # this checkpoint's
    (step / "trainer.json").write_text(json.dumps({"step": 2, "epoch": 0}))
    weights = model("resnet10t", 0).state_dict()
    save_file({k: v.contiguous() for k, v in prefixed(weights, "backbone.").items()}, str(step / "model.safetensors"))
    out = tmp_path / "exported.safetensors"
    old = os.umask(0o027)
    try:
        assert export_main([str(step), str(out)]) == 0
    finally:
        os.umask(old)
    assert meta_of(out)["mean"] == [0.1, 0.2, 0.3]
    assert os.stat(out).st_mode & 0o777 == 0o640


def test_export_errors_are_one_line(tmp_path, capsys):
    src = tmp_path / "plain.pth"
    torch.save(model("resnet10t", 0).state_dict(), src)
    vit = tmp_path / "vit.pth"
    torch.save(model("vit_tiny_patch16_224", 0).state_dict(), vit)
    empty_run = tmp_path / "run"
    empty_run.mkdir()
    cases = [([str(src), str(tmp_path / "o.safetensors")], "needs --model TIMM_NAME"),
             ([str(src), str(tmp_path / "o.safetensors"), "--model", "resnet18"], "uninitialised"),
             ([str(empty_run), str(tmp_path / "o.safetensors")], "no complete training checkpoint"),
             ([str(tmp_path / "nope"), str(tmp_path / "o.safetensors")], "not found"),
             # the model cannot take the input size given: timm asserts, one line here
             ([str(vit), str(tmp_path / "o.safetensors"), "--model", "vit_tiny_patch16_224", "--input-size", "96"],
              "fails on a 96x96 input")]
    for argv, message in cases:
        capsys.readouterr()
        assert export_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("selfsup-export: error:") and message in err[0], err
    assert not (tmp_path / "o.safetensors").exists()
