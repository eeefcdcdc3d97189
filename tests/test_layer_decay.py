"""optim.layer_decay: each backbone parameter's learning rate is lr * decay ** (last layer - its
layer), with the layers written out here by hand for a ResNet (stem, each residual block) and a
ViT (embeddings, each block); heads train at the full rate; the trainer's
scheduler applies the scales; a momentum copy is not optimised at all."""

import pytest
import torch

from conftest import ROOT, write_shards
from tinyrun import TINY

DECAY = 0.5


def resnet_layer(name: str) -> int:
    """resnet10t (one block per stage): stem 0, layerK.0 K; the last layer is 4."""
    if name.startswith("layer"):
        return int(name[len("layer")])
    return 0


def vit_layer(name: str, depth: int) -> int:
    """ViT: cls token, positions, patch embedding 0; blocks.i i+1; the final norm with the last
    block (timm's matcher leaves it unmapped, which timm gives the top layer): the last is depth."""
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    if name.startswith("norm."):
        return depth
    return 0


def trainer(tmp_path, *overrides):
    from selfsup.config import load_recipe
    from selfsup.trainer import Trainer

    shards = write_shards(tmp_path / "s", n=32, shard_size=32)
    cfg = load_recipe([ROOT / "recipes" / "tiny.yaml"], [f"data.train={shards}", f"run.dir={tmp_path / 'run'}",
                                                          *TINY, f"optim.layer_decay={DECAY}", "optim.lr=0.1",
                                                          "optim.lr_scaling=none", *overrides])
    return Trainer(cfg)


def lr_of(optimizer) -> dict:
    return {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("arch", ["resnet", "vit"])
def test_layer_scales_against_the_formula(tmp_path, arch):
    if arch == "resnet":
        t = trainer(tmp_path, "model.name=resnet10t")
        layer, last = resnet_layer, 4
    else:
        t = trainer(tmp_path, "model.name=vit_tiny_patch16_224", "model.kwargs.img_size=16",
                    "model.kwargs.patch_size=4", "model.kwargs.depth=3", "model.kwargs.embed_dim=48",
                    "model.kwargs.num_heads=2")
        layer, last = (lambda n: vit_layer(n, 3)), 3
    t.scheduler.step_update(0)  # no warm-up: the peak at step 0
    lrs = lr_of(t.optimizer)
    backbone = t.objective.backbone
    seen = set()
    for name, p in backbone.named_parameters():
        assert lrs[id(p)] == pytest.approx(0.1 * DECAY ** (last - layer(name))), name
        seen.add(layer(name))
    assert seen == set(range(last + 1))  # every layer occurs: the written-out map is the model's
    inside = {id(p) for p in backbone.parameters()}
    head = [p for p in t.objective.parameters() if id(p) not in inside]
    assert head and all(lrs[id(p)] == pytest.approx(0.1) for p in head)
    decays = {id(p): g["weight_decay"] for g in t.optimizer.param_groups for p in g["params"]}
    assert all((decays[id(p)] == 0) == (p.ndim <= 1 or n in ("pos_embed", "cls_token"))
               for n, p in backbone.named_parameters())


def test_moco_key_encoder_is_not_optimised_and_off_is_unchanged(tmp_path):
    t = trainer(tmp_path, "model.name=resnet10t", "objective.name=moco", "objective.queue_size=64",
                "objective.momentum=0.9", "objective.bn_splits=2")
    optimised = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in t.objective.backbone_key.parameters()}
    assert {id(p) for p in t.objective.backbone.parameters()} <= optimised
    plain = trainer(tmp_path / "b", "model.name=resnet10t", "optim.layer_decay=null")
    plain.scheduler.step_update(0)
    assert all(g["lr"] == pytest.approx(0.1) for g in plain.optimizer.param_groups)
    assert len(plain.optimizer.param_groups) == 2  # timm's decay / no-decay groups, as before


def test_a_bad_layer_decay_is_one_line(tmp_path):
    from selfsup.config import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=r"optim.layer_decay must be in \(0, 1\]"):
        load_recipe([ROOT / "recipes" / "tiny.yaml"], ["optim.layer_decay=1.5"])
    torch.manual_seed(0)
