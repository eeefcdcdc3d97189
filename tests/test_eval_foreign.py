"""Checkpoints of other frameworks: every layout of issue #14 built here from a small timm model
must give exactly the features of the same weights loaded directly; unpickling is restricted to
weights_only with an allow-list, and a crafted pickle runs nothing."""

import argparse
import pickle
from collections import OrderedDict

import pytest
import timm
import torch

from selfsup_eval.checkpoint import EvalError
from selfsup_eval.cli import main
from selfsup_eval.foreign import load_foreign
from test_eval_fixtures import write_split

RESNET_KW = {}
VIT_KW = {"img_size": 16, "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 2}
IJEPA_KW = {**VIT_KW, "class_token": False, "global_pool": "avg"}  # I-JEPA's ViT: no class token


def model(name, seed, **kw):
    torch.manual_seed(seed)
    m = timm.create_model(name, pretrained=False, num_classes=0, **kw)
    with torch.no_grad():
        for mod in m.modules():  # non-trivial BatchNorm statistics, so a lost buffer shows
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


def prefixed(state, prefix):
    return OrderedDict((prefix + k, v) for k, v in state.items())


def with_head(name, seed, **kw):
    torch.manual_seed(seed + 100)
    return timm.create_model(name, pretrained=False, num_classes=7, **kw).state_dict()


def layouts():
    """(name, timm model, kwargs, seed of the expected weights, builder(state of that model))."""
    def torchvision_like(s):  # a supervised ResNet state dict: the timm/torchvision names, plus fc
        full = with_head("resnet10t", 0)
        return OrderedDict({**s, "fc.weight": full["fc.weight"], "fc.bias": full["fc.bias"]})

    def timm_train(s):  # timm's train.py: state_dict + its argparse.Namespace of arguments
        return {"epoch": 3, "arch": "resnet10t", "state_dict": s, "args": argparse.Namespace(lr=0.1, model="resnet10t"),
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}}

    def moco(s):  # official MoCo v1/v2: query and key encoders under module., plus fc head and queue
        other = model("resnet10t", 9).state_dict()
        return {"epoch": 200, "arch": "resnet10t",
                "state_dict": OrderedDict({**prefixed(other, "module.encoder_k."), **prefixed(s, "module.encoder_q."),
                                           "module.encoder_q.fc.0.weight": torch.randn(8, 512),
                                           "module.queue": torch.randn(8, 16), "module.queue_ptr": torch.zeros(1)}),
                "optimizer": {"state": {}, "param_groups": []}}

    def ijepa(s):  # I-JEPA: encoder / target_encoder / predictor, each DDP-wrapped (module.)
        other = model("vit_tiny_patch16_224", 9, **IJEPA_KW).state_dict()
        return {"encoder": prefixed(other, "module."), "target_encoder": prefixed(s, "module."),
                "predictor": {"module.predictor_embed.weight": torch.randn(4, 48)}, "epoch": 10, "loss": 0.5}

    def dino(s):  # DINO: student (module.backbone.) and teacher (backbone.) with heads, and args
        other = model("vit_tiny_patch16_224", 9, **VIT_KW).state_dict()
        return {"student": OrderedDict({**prefixed(other, "module.backbone."), "module.head.last_layer.weight": torch.randn(5, 4)}),
                "teacher": OrderedDict({**prefixed(s, "backbone."), "head.mlp.0.weight": torch.randn(4, 48)}),
                "epoch": 100, "args": argparse.Namespace(arch="vit_tiny", out_dim=5)}

    def solo(s):  # solo-learn (Lightning): state_dict with backbone., momentum_backbone., projector.
        other = model("resnet10t", 9).state_dict()
        return {"epoch": 99, "global_step": 1000, "pytorch-lightning_version": "2.0.0",
                "state_dict": OrderedDict({**prefixed(other, "momentum_backbone."), **prefixed(s, "backbone."),
                                           "projector.0.weight": torch.randn(8, 512)}),
                "hyper_parameters": {"method": "byol"}}

    def lightly(s):  # lightly's examples: backbone = nn.Sequential(*list(resnet.children())[:-1])
        m = model("resnet10t", 0)
        seq = torch.nn.Sequential(*list(m.children())[:-2])  # up to layer4 (global_pool, fc dropped)
        return {"state_dict": OrderedDict({**prefixed(seq.state_dict(), "backbone."),
                                           "projection_head.layers.0.weight": torch.randn(8, 512)})}

    return [("plain", "resnet10t", RESNET_KW, lambda s: s),
            ("torchvision", "resnet10t", RESNET_KW, torchvision_like),
            ("timm", "resnet10t", RESNET_KW, timm_train),
            ("moco", "resnet10t", RESNET_KW, moco),
            ("ijepa", "vit_tiny_patch16_224", IJEPA_KW, ijepa),
            ("dino", "vit_tiny_patch16_224", VIT_KW, dino),
            ("solo-learn", "resnet10t", RESNET_KW, solo),
            ("lightly", "resnet10t", RESNET_KW, lightly)]


@pytest.mark.parametrize("layout", layouts(), ids=lambda l: l[0])
def test_every_layout_gives_the_features_of_the_weights_loaded_directly(tmp_path, layout):
    name, timm_name, kw, build = layout
    direct = model(timm_name, 0, **kw)
    path = tmp_path / f"{name}.pth"
    torch.save(build(direct.state_dict()), path)
    bb, note = load_foreign(str(path), timm_name, kw, input_size=16)
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(bb.features(x), direct(x))
    assert note.count("\n") == 0 and f"{len(direct.state_dict())} tensors" in note
    assert bb.meta["mean"] == list(direct.pretrained_cfg["mean"]) and bb.meta["input_size"] == 16


def test_safetensors_input_and_the_overrides(tmp_path):
    from safetensors.torch import save_file

    direct = model("resnet10t", 0)
    path = tmp_path / "dino_like.safetensors"  # no selfsup metadata: read as a plain file
    save_file({k: v.contiguous() for k, v in prefixed(direct.state_dict(), "enc.").items()}, str(path))
    bb, note = load_foreign(str(path), "resnet10t", prefix="enc.", input_size=16, mean=[0.5], std=[0.2])
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(bb.features(x), direct(x)) and bb.meta["std"] == [0.2]
    assert "prefix 'enc.'" in note and bb.meta["source"]["read_with"] == "safetensors"
    default = load_foreign(str(path), "resnet10t")[0]  # size/mean/std from timm's pretrained config
    assert default.meta["input_size"] == direct.pretrained_cfg["input_size"][-1]
    assert default.meta["std"] == list(direct.pretrained_cfg["std"])


def test_checkpoint_key_selects_another_encoder(tmp_path):
    dino = model("vit_tiny_patch16_224", 0, **VIT_KW)
    student = model("vit_tiny_patch16_224", 9, **VIT_KW)
    path = tmp_path / "dino.pth"
    torch.save({"teacher": prefixed(dino.state_dict(), "backbone."),
                "student": prefixed(student.state_dict(), "module.backbone.")}, path)
    bb, _ = load_foreign(str(path), "vit_tiny_patch16_224", VIT_KW, key="student", input_size=16)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(bb.features(x), student(x))


def test_two_encoders_no_preference_ranks_are_an_error_not_a_guess(tmp_path):
    """BYOL-style: online and target encoders map the same number of weights and PREFERRED ranks
    neither; which one is evaluated used to follow the checkpoint's key order."""
    online, target = model("resnet10t", 0).state_dict(), model("resnet10t", 9).state_dict()
    path = tmp_path / "byol.pth"
    torch.save({"state_dict": OrderedDict({**prefixed(target, "target_network."),
                                           **prefixed(online, "online_network.")})}, path)
    with pytest.raises(EvalError, match=r"prefixes 'online_network.', 'target_network.' each hold "
                                        r"\d+ of the model's weights: pass --prefix"):
        load_foreign(str(path), "resnet10t", input_size=16)
    bb, _ = load_foreign(str(path), "resnet10t", prefix="online_network.", input_size=16)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(bb.features(x), model("resnet10t", 0)(x))


def test_uninitialised_backbone_weights_are_an_error(tmp_path):
    state = model("resnet10t", 0).state_dict()
    partial = {k: v for k, v in state.items() if not k.startswith("layer4.")}
    torch.save({"state_dict": partial}, tmp_path / "partial.pth")
    with pytest.raises(EvalError, match=r"would stay uninitialised \(e\.g\. layer4"):
        load_foreign(str(tmp_path / "partial.pth"), "resnet10t")
    torch.save(state, tmp_path / "r.pth")
    with pytest.raises(EvalError, match="would stay uninitialised"):  # the wrong architecture
        load_foreign(str(tmp_path / "r.pth"), "resnet18")
    with pytest.raises(EvalError, match="is not a timm model name"):
        load_foreign(str(tmp_path / "r.pth"), "no_such_model")


class Payload:
    """Unpickling this would create ``target`` (what a malicious checkpoint would do instead)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_crafted_pickle_is_refused_in_one_line_and_runs_nothing(tmp_path, capsys):
    target = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": model("resnet10t", 0).state_dict(), "x": Payload(str(target))}, evil)
    legacy = tmp_path / "legacy.pkl"  # a bare pickle, not a torch zip
    legacy.write_bytes(pickle.dumps({"state_dict": {}, "x": Payload(str(target))}, protocol=2))
    framed = tmp_path / "framed.pkl"  # protocol 4: refused at an opcode torch's unpickler lacks
    framed.write_bytes(pickle.dumps({"state_dict": {}, "x": Payload(str(target))}, protocol=4))
    for path, message in ((evil, r"refusing to unpickle (io|builtins)\.open"),
                          (legacy, r"refusing to unpickle (io|builtins)\.open"),
                          (framed, r"weights_only=True\) can read .*nothing in the file was run")):
        with pytest.raises(EvalError, match=message) as e:
            load_foreign(str(path), "resnet10t")
        assert "\n" not in str(e.value)
        assert not target.exists()
    root = tmp_path / "d"
    train, val = write_split(root, "train", 8), write_split(root, "val", 4, seed=1)
    rc = main(["knn", str(evil), "--model", "resnet10t", "--train", str(train), "--val", str(val),
               "--k", "1", "--no-cache"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("selfsup-eval: error:") and "refusing to unpickle" in err[-1]
    assert not target.exists()


def test_the_cli_evaluates_a_foreign_checkpoint_and_explains_a_missing_model(tmp_path, capsys):
    root = tmp_path / "d"
    train, val = write_split(root, "train", 24), write_split(root, "val", 9, seed=1)
    direct = model("resnet10t", 0)
    path = tmp_path / "moco.pth.tar"
    torch.save({"state_dict": prefixed(direct.state_dict(), "module.encoder_q.")}, path)
    out = tmp_path / "out"
    argv = ["knn", str(path), "--train", str(train), "--val", str(val), "--k", "3", "--no-cache"]
    assert main(argv) == 2
    assert "--model TIMM_NAME" in capsys.readouterr().err
    assert main(argv + ["--model", "resnet10t", "--input-size", "16", "--out", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "note: " in shown and "prefix 'module.encoder_q.'" in shown and "moco.pth[resnet10t]" in shown
