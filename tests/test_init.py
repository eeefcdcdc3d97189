"""model.init: a run starts from a checkpoint in any layout the evaluator reads, or from timm's
pretrained weights found offline. The backbone before the first optimiser step equals the file's
weights exactly (BatchNorm statistics included), momentum copies start equal to it, heads stay
fresh, and every bad file is one line with exit status 2 before anything trains."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT, write_shards
from test_eval_foreign import IJEPA_KW, VIT_KW, Payload, layouts, model, prefixed
from tinyrun import TINY, TINY_NO_HEAD, train

LAYOUTS = {name: (timm_name, kw, build) for name, timm_name, kw, build in layouts()}


def kwargs_overrides(kw: dict) -> list[str]:
    return [f"model.kwargs.{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in kw.items()]


def trainer_for(tmp_path, *overrides, recipe="tiny.yaml", tiny=TINY):
    from selfsup.config import load_recipe
    from selfsup.trainer import Trainer

    shards = write_shards(tmp_path / "s", n=32, shard_size=32)
    cfg = load_recipe([ROOT / "recipes" / recipe], [f"data.train={shards}", f"run.dir={tmp_path / 'run'}",
                                                     *tiny, *overrides])
    return Trainer(cfg)


def assert_same(module, expected: dict):
    got = module.state_dict()
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("layout", ["torchvision", "moco", "dino", "ijepa", "solo-learn", "timm", "lightly"])
def test_every_layout_starts_the_backbone_at_the_files_weights(tmp_path, layout):
    timm_name, kw, build = LAYOUTS[layout]
    direct = model(timm_name, 0, **kw)
    path = tmp_path / f"{layout}.pth"
    torch.save(build(direct.state_dict()), path)
    t = trainer_for(tmp_path, f"model.name={timm_name}", *kwargs_overrides(kw), f"model.init={path}")
    assert_same(t.objective.backbone, direct.state_dict())
    assert t.state["init"]["sha256"] and t.state["init"]["source"] == str(path.resolve())


def test_a_selfsup_export_and_the_key_and_prefix_overrides(tmp_path):
    """The trainer's own export is a layout too; model.init_key/init_prefix pick another encoder
    of a file (here solo-learn's momentum backbone), as --checkpoint-key/--prefix do."""
    from selfsup.checkpoint import export_backbone

    direct = model("resnet10t", 0)
    meta = {"model_name": "resnet10t", "model_kwargs": {"num_classes": 0}, "input_size": 16,
            "mean": [0.5] * 3, "std": [0.2] * 3, "step": 7}
    path = export_backbone(direct, tmp_path / "prev", meta)
    t = trainer_for(tmp_path / "a", "model.name=resnet10t", f"model.init={path}")
    assert_same(t.objective.backbone, direct.state_dict())
    other = model("resnet10t", 5)
    solo = tmp_path / "solo.pth"
    torch.save({"state_dict": {**prefixed(direct.state_dict(), "backbone."),
                               **prefixed(other.state_dict(), "momentum_backbone.")}}, solo)
    t = trainer_for(tmp_path / "b", "model.name=resnet10t", f"model.init={solo}",
                    "model.init_prefix=momentum_backbone.")
    assert_same(t.objective.backbone, other.state_dict())
    nested = tmp_path / "nested.pth"
    torch.save({"state_dict": direct.state_dict(), "ema": other.state_dict()}, nested)
    t = trainer_for(tmp_path / "c", "model.name=resnet10t", f"model.init={nested}", "model.init_key=ema")
    assert_same(t.objective.backbone, other.state_dict())


def test_moco_key_encoder_starts_equal_and_heads_stay_fresh(tmp_path):
    direct = model("resnet10t", 0)
    path = tmp_path / "w.pth"
    torch.save(direct.state_dict(), path)
    moco = ["objective.name=moco", "objective.queue_size=64", "objective.momentum=0.9", "objective.bn_splits=2"]
    t = trainer_for(tmp_path, "model.name=resnet10t", f"model.init={path}", *moco)
    assert_same(t.objective.backbone, direct.state_dict())
    assert_same(t.objective.backbone_key, direct.state_dict())
    fresh = trainer_for(tmp_path / "r", "model.name=resnet10t", *moco)  # same seed, random init
    assert_same(t.objective.head, fresh.objective.head.state_dict())


@pytest.mark.parametrize("recipe", ["ijepa", "dino-vit-with-class-token"])
def test_vits_with_and_without_class_token(tmp_path, recipe):
    """I-JEPA: its context encoder and its target start at the file (no class token); a ViT with
    a class token (DINO's teacher) under SimCLR."""
    if recipe == "ijepa":
        kw = {**IJEPA_KW, "patch_size": 2, "fc_norm": False}  # I-JEPA's ViT keeps its final norm
        direct = model("vit_tiny_patch16_224", 0, **kw)
        path = tmp_path / "ijepa.pth"
        torch.save({"encoder": prefixed(model("vit_tiny_patch16_224", 9, **kw).state_dict(), "module."),
                    "target_encoder": prefixed(direct.state_dict(), "module.")}, path)
        t = trainer_for(tmp_path, "model.name=vit_tiny_patch16_224", *kwargs_overrides(kw), f"model.init={path}",
                        "objective.pred_depth=1", "objective.pred_dim=16", "objective.min_keep=4",
                        recipe="ijepa_vit_tiny.yaml", tiny=TINY_NO_HEAD)
        assert_same(t.objective.encoder.vit, direct.state_dict())
        assert_same(t.objective.target.vit, direct.state_dict())
    else:
        direct = model("vit_tiny_patch16_224", 0, **VIT_KW)
        path = tmp_path / "dino.pth"
        torch.save({"teacher": prefixed(direct.state_dict(), "backbone.")}, path)
        t = trainer_for(tmp_path, "model.name=vit_tiny_patch16_224", *kwargs_overrides(VIT_KW), f"model.init={path}")
        assert_same(t.objective.backbone, direct.state_dict())


def hf_cache(root, repo: str, state: dict):
    """A Hugging Face hub cache as huggingface_hub lays it out: refs/main -> snapshots/HASH."""
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text("abc123")
    snap = base / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snap / "model.safetensors"))
    return snap / "model.safetensors"


def test_timm_weights_from_the_local_cache_and_their_normalisation(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as hc
    import timm

    pretrained = timm.models.get_pretrained_cfg("resnet10t")
    torch.manual_seed(3)
    full = timm.create_model("resnet10t", num_classes=1000).state_dict()  # with its fc, as published
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hf_cache(tmp_path / "hub", pretrained.hf_hub_id, full)
    t = trainer_for(tmp_path / "a", "model.name=resnet10t", "model.init=timm")
    assert_same(t.objective.backbone, {k: v for k, v in full.items() if not k.startswith("fc.")})
    assert list(t.cfg.augment.mean) == list(pretrained.mean) and list(t.cfg.augment.std) == list(pretrained.std)
    capsys.readouterr()
    t = trainer_for(tmp_path / "b", "model.name=resnet10t", "model.init=timm", "augment.mean=[0.5,0.5,0.5]")
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("selfsup-train")]
    assert list(t.cfg.augment.mean) == [0.5] * 3
    assert len(err) == 1 and "warning" in err[0] and "using the recipe's" in err[0]
    overlay = tmp_path / "mine.safetensors"  # timm's pretrained_cfg_overlay=dict(file=...)
    other = model("resnet10t", 4).state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, str(overlay))
    t = trainer_for(tmp_path / "c", "model.name=resnet10t", "model.init=timm",
                    f"model.kwargs.pretrained_cfg_overlay.file={overlay}")
    assert_same(t.objective.backbone, other)


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("selfsup-train: error:"), err
    return err[0]


def test_bad_init_files_are_one_line_and_nothing_trains(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants as hc

    shards = write_shards(tmp_path / "s", n=32, shard_size=32)
    vit = tmp_path / "vit.pth"
    torch.save(model("vit_tiny_patch16_224", 0, **VIT_KW).state_dict(), vit)
    good = tmp_path / "good.safetensors"
    save_file({k: v.contiguous() for k, v in model("test_resnet", 0).state_dict().items()}, str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    target = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": model("test_resnet", 0).state_dict(), "x": Payload(str(target))}, evil)
    legacy = tmp_path / "legacy.pkl"
    legacy.write_bytes(pickle.dumps({"x": Payload(str(target))}, protocol=2))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    nan = tmp_path / "nan.safetensors"
    poisoned = {k: v.contiguous() for k, v in model("test_resnet", 0).state_dict().items()}
    next(v for v in poisoned.values() if v.is_floating_point())[0] = float("nan")
    save_file(poisoned, str(nan))
    cases = [(vit, "would stay uninitialised"), (truncated, "not a readable safetensors file"),
             (nan, "NaN/inf value"),
             (evil, "refusing to unpickle"), (legacy, "refusing to unpickle"),
             ("timm", "no local pretrained weights for test_resnet (looked in"),
             (tmp_path / "nope.pth", "is not a file")]
    for i, (init, message) in enumerate(cases):
        run = tmp_path / f"run{i}"
        capsys.readouterr()
        assert train("tiny.yaml", shards, run, f"model.init={init}", "train.max_steps=2") == 2
        line = one_error(capsys)
        assert message in line, line
        assert init != "timm" or "empty-hub" in line  # says where it looked
        assert not (run / "metrics.jsonl").exists() and not (run / "export").exists()
        assert not target.exists()


def test_jigclu_starts_from_a_small_stem_export(tmp_path):
    """JigClu's backbone (a small-stem ResNet, as jigclu_small.yaml's) starts at a selfsup
    export of the same architecture; its heads stay fresh."""
    from selfsup.checkpoint import export_backbone
    from selfsup.models import create_backbone

    torch.manual_seed(5)
    src = create_backbone("test_resnet", small_stem=True)
    with torch.no_grad():
        for m in src.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
    meta = {"model_name": "test_resnet", "model_kwargs": {"num_classes": 0}, "small_stem": True,
            "input_size": 16, "mean": [0.5] * 3, "std": [0.2] * 3, "step": 3}
    path = export_backbone(src, tmp_path / "prev", meta)
    jc = ["model.name=test_resnet", "model.small_stem=true", "objective.proj_hidden_dim=64", "objective.proj_dim=32"]
    t = trainer_for(tmp_path / "a", *jc, f"model.init={path}", recipe="jigclu_small.yaml")
    assert_same(t.objective.backbone, src.state_dict())
    fresh = trainer_for(tmp_path / "b", *jc, recipe="jigclu_small.yaml")
    inside = set(t.objective.backbone.state_dict())
    heads = {k: v for k, v in fresh.objective.state_dict().items() if not k.startswith("backbone.")}
    ours = {k: v for k, v in t.objective.state_dict().items() if not k.startswith("backbone.")}
    assert heads and inside and all(torch.equal(ours[k], heads[k]) for k in heads)


def test_a_resume_needs_no_starting_file_and_keeps_its_provenance(tmp_path):
    from safetensors import safe_open

    shards = write_shards(tmp_path / "s", n=32, shard_size=32)
    start = tmp_path / "start.pth"
    torch.save(model("test_resnet", 0).state_dict(), start)
    run = tmp_path / "run"
    assert train("tiny.yaml", shards, run, f"model.init={start}", "train.max_steps=2") == 0
    start.unlink()  # the checkpoint, not the file, is where a resume starts
    assert train("tiny.yaml", shards, run, f"model.init={start}", "train.max_steps=3", "--accept-changes") == 0

    def init_of(step):
        with safe_open(str(run / "export" / f"backbone-step{step:09d}.safetensors"), "pt") as f:
            return json.loads(f.metadata()["selfsup"])["init"]
    assert init_of(3) == init_of(2) and init_of(2)["source"] == str(start.resolve())
