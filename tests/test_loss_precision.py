"""Losses run in fp32 under the trainer's bf16 autocast (on by default on GPUs): casting the
embeddings to fp32 was not enough, autocast still ran the similarity matmuls (lightly's einsum,
JigClu's heads and z @ z.T) in bf16. Checked on the CPU's bf16 autocast: with the backbone's output
held fixed, the loss under autocast is the fp32 loss."""

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT
from selfsup.config import load_recipe
from selfsup.models import create_backbone
from selfsup.objectives import build_objective

TINY = str(ROOT / "recipes" / "tiny.yaml")
JIGCLU = ["model.name=test_resnet", "model.small_stem=true", "augment.size=16",
          "objective.proj_hidden_dim=64", "objective.proj_dim=32"]


def build(recipe, *overrides):
    cfg = load_recipe(recipe, list(overrides))
    torch.manual_seed(0)
    backbone = create_backbone(cfg.model.name, OmegaConf.to_container(cfg.model.kwargs), cfg.model.small_stem)
    return build_objective(cfg, backbone)


def both(loss_fn):
    plain = loss_fn()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss_fn()
    return plain, mixed


@pytest.mark.parametrize("overrides", [["objective.loss=infonce"], ["objective.loss=dcl"], ["objective.loss=dclw"],
                                       ["objective.hallucinator.enabled=true", "objective.hallucinator.hidden_dim=48"]])
def test_simclr_losses_are_fp32_under_autocast(overrides):
    obj = build(TINY, "objective.temperature=0.1", *overrides)
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(64, 32, generator=g), dim=1) * 3 + 0.5  # near-parallel rows
    obj.embed = lambda views: z  # the backbone and head's output, held fixed
    v = torch.zeros(32, 3, 8, 8)
    plain, mixed = both(lambda: obj.loss_from_views(v, v, generator=torch.Generator().manual_seed(1))[0])
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain, rtol=1e-6, atol=1e-6)


def test_jigclu_heads_and_losses_are_fp32_under_autocast():
    obj = build(str(ROOT / "recipes" / "jigclu_small.yaml"), *JIGCLU)
    n = 8
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(4 * n, obj.backbone.num_features, generator=g) * 4
    perm = torch.randperm(4 * n, generator=g)
    mine = torch.arange(4 * n)
    obj.tiles = lambda patches: (feats, perm, mine)  # the backbone's tile features, held fixed
    plain, mixed = both(lambda: obj.loss_from_patches(torch.zeros(4 * n, 3, 8, 8))[0])
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("recipe,overrides,warned", [
    (TINY, [], True),  # SimCLR
    (str(ROOT / "recipes" / "jigclu_small.yaml"), JIGCLU, True),
    (TINY, ["objective.name=moco", "objective.queue_size=64"], False),  # queue negatives: not concerned
])
def test_accumulation_with_in_batch_negatives_is_said_once(recipe, overrides, warned, capsys):
    build(recipe, *overrides, "train.grad_accum=4")
    err = capsys.readouterr().err
    assert ("train.grad_accum=4" in err and "does not enlarge the set of negatives" in err) == warned
    assert err.count("warning") == int(warned)
    build(recipe, *overrides)  # no accumulation: nothing said
    assert capsys.readouterr().err == ""
