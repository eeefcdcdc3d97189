"""Jigsaw Clustering: patch geometry, montage ↔ tile-feature round trip and labels, SupCon against a
per-anchor loop, 1 vs 2 processes, bad values, and the small recipe end to end."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import ROOT, child_env, torchrun_cmd
from selfsup.config import load_recipe
from selfsup.models import create_backbone
from selfsup.objectives import build_objective
from selfsup.objectives.jigclu import quadrants, supcon_loss, tile_features
from tinyrun import run_recipe_and_evaluate, train

RECIPE = "jigclu_small.yaml"
# 16 px montages of 8 px patches; test_resnet with the 3x3 stride-1 stem ends on a 2x2 map
JC = ["model.name=test_resnet", "model.small_stem=true", "augment.size=16", "objective.proj_hidden_dim=64",
      "objective.proj_dim=32"]


class Identity(torch.nn.Module):
    """A 'backbone' whose feature map is its input: tile features = mean colour of each tile."""

    num_features = 3

    def forward_features(self, x):
        return x

    def forward(self, x):
        return x.mean((2, 3))


def build(backbone=None, *overrides):
    cfg = load_recipe(str(ROOT / "recipes" / RECIPE), [*JC, *overrides])
    torch.manual_seed(0)
    if backbone is None:
        backbone = create_backbone(cfg.model.name, OmegaConf.to_container(cfg.model.kwargs), cfg.model.small_stem)
    return build_objective(cfg, backbone)


def test_quadrants_overlap_by_the_cross_ratio_in_the_official_order():
    img = torch.arange(20 * 20).reshape(1, 1, 20, 20)
    tl, bl, tr, br = quadrants(img, 0.3)
    assert all(q.shape[-2:] == (16, 16) for q in (tl, bl, tr, br))  # 10 + 0.3·20 = 0.8 of the side
    assert tl[0, 0, 0, 0] == 0 and bl[0, 0, 0, 0] == 4 * 20 and tr[0, 0, 0, 0] == 4
    assert br[0, 0, -1, -1] == 20 * 20 - 1 and bl[0, 0, -1, 0] == 19 * 20


def test_montage_tiles_round_trip_to_their_patches_and_labels():
    """Patch (image i, quadrant q) is a constant colour encoding (i, q); with an identity backbone
    the pooled feature of every tile row must decode to the patch the permutation put there."""
    obj = build(Identity())
    n = 6
    code = torch.stack([torch.full((3, 8, 8), 10.0 * i + q) for q in range(4) for i in range(n)])  # [P0..P3]
    for step in range(3):
        feats, perm, mine = obj.tiles(code)
        assert feats.shape == (4 * n, 3) and sorted(mine.tolist()) == list(range(4 * n))
        source = perm  # G index of each row: image perm % n, quadrant perm // n
        torch.testing.assert_close(feats[:, 0], 10.0 * (source % n) + source // n)
        assert sorted(perm.tolist()) == list(range(4 * n))
        assert torch.bincount(perm % n, minlength=n).tolist() == [4] * n  # every image 4 times
        assert int(obj.perm_calls) == step + 1
    # a new permutation each step, reproducible from the seed and the counter
    p1 = build(Identity()).tiles(code)[1]
    p2 = build(Identity()).tiles(code)[1]
    assert torch.equal(p1, p2) and not torch.equal(p1, perm)


def test_loss_labels_are_source_image_and_original_quadrant():
    obj = build(Identity(), "objective.proj_hidden_dim=8", "objective.proj_dim=4")
    n = 4
    code = torch.stack([torch.full((3, 8, 8), 10.0 * i + q) for q in range(4) for i in range(n)])
    captured = {}
    orig_ce = F.cross_entropy

    def spy(logits, target, *a, **k):
        captured["loc"] = target.clone()
        return orig_ce(logits, target, *a, **k)

    F.cross_entropy = spy
    try:
        obj.loss_from_patches(code)
    finally:
        F.cross_entropy = orig_ce
    assert torch.equal(captured["loc"], obj.permutation_log // n)  # quadrant in its source image


def slow_supcon(z, labels, t, anchors):
    losses = []
    for a in anchors.tolist():
        others = [o for o in range(len(z)) if o != a]
        denom = torch.logsumexp(torch.stack([z[a] @ z[o] / t for o in others]), 0)
        pos = [p for p in others if labels[p] == labels[a]]
        assert len(pos) == 3
        losses.append(-sum(z[a] @ z[p] / t - denom for p in pos) / len(pos))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("subset", [False, True])
def test_supcon_equals_a_per_anchor_loop_with_three_positives(subset):
    g = torch.Generator().manual_seed(0)
    n = 5
    z = F.normalize(torch.randn(4 * n, 7, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    labels = torch.randperm(4 * n, generator=g) % n
    anchors = torch.arange(4 * n) if not subset else torch.tensor([0, 3, 7, 12, 19])
    fast = supcon_loss(z, labels, 0.3, anchors)
    slow = slow_supcon(z, labels, 0.3, anchors)
    torch.testing.assert_close(fast, slow)
    (gf,) = torch.autograd.grad(fast, z)
    (gs,) = torch.autograd.grad(slow, z)
    torch.testing.assert_close(gf, gs)


def test_odd_feature_maps_are_resized_before_the_2x2_pooling():
    fmap = torch.zeros(1, 1, 7, 7)
    fmap[..., :4, :4] = 1.0  # with 7x7 plain 2x2 pooling, row/column 3 would be shared
    tiles = tile_features(fmap)[:, 0]
    even = tile_features(F.interpolate(fmap, size=(8, 8), mode="bilinear", align_corners=False))[:, 0]
    torch.testing.assert_close(tiles, even)
    assert tiles[0] > 0.9 and tiles[3] < 0.05  # (0,0) bright, (1,1) dark


def test_backbone_parameters_the_tiles_never_use_are_frozen():
    """ConvNeXt's head norm sits after forward_features: trainable, it would get no gradient and
    DDP would skip the gradient averaging of the first step (then fail the second)."""
    obj = build(create_backbone("test_convnext"), "model.small_stem=false", "augment.size=64")
    assert obj.frozen == ["head.norm.weight", "head.norm.bias"]
    assert not obj.backbone.head.norm.weight.requires_grad and obj.backbone.stem[0].weight.requires_grad
    assert build().frozen == []  # a ResNet uses everything


def test_two_processes_give_one_process_permutation_loss_and_gradients(tmp_path):
    script = str(ROOT / "tests" / "scripts" / "jigclu_check.py")
    recipe = str(ROOT / "recipes" / RECIPE)
    env = child_env()
    r = subprocess.run([sys.executable, script, recipe, str(tmp_path / "one.pt")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(torchrun_cmd(2, script, recipe, str(tmp_path / "two.pt")), env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert torch.equal(one["perm"], two["perm"])
    torch.testing.assert_close(one["loss"], two["loss"], rtol=1e-9, atol=1e-12)
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 10
    for k in one["grads"]:
        torch.testing.assert_close(one["grads"][k], two["grads"][k], rtol=1e-6, atol=1e-9, msg=k)


def test_jigclu_recipe_trains_locates_and_its_export_evaluates(tmp_path):
    # no flips and mild crops: a quadrant keeps where the blob of a tiny image sits in it
    curve, knn = run_recipe_and_evaluate(tmp_path, RECIPE, *JC, "optim.lr_scaling=none", "augment.hflip_p=0",
                                         "augment.scale=[0.8,1.0]", epochs=15)
    assert 0.0 <= knn <= 1.0
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss_clu"]) and math.isfinite(r["loss_loc"]) for r in log)
    first, last = log[:8], log[-8:]
    assert sum(r["loss_loc"] for r in last) < sum(r["loss_loc"] for r in first)
    assert sum(r["loss_clu"] for r in last) < sum(r["loss_clu"] for r in first)
    assert sum(r["loc_acc"] for r in last) / 8 > 0.35  # chance is 0.25


@pytest.mark.parametrize("args,message", [
    (["augment.size=15"], "augment.size=15 must be even"),
    (["objective.cross_ratio=0.6"], "objective.cross_ratio must be in [0, 0.5), not 0.6"),
    (["objective.temperature=0"], "objective.temperature and objective.base_temperature must be > 0"),
])
def test_bad_jigclu_values_are_one_line_errors(tmp_path, shards, capsys, args, message):
    assert train(RECIPE, shards, tmp_path / "run", *JC, *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("selfsup-train: error:") and message in err and "\n" not in err
