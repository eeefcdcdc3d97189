"""Jigsaw Clustering: patch geometry, montage ↔ tile-feature round trip (identity, ResNet and ViT
backbones) and labels, SupCon and the whole objective loss against slow loops, the checkpointed
permutation counter, 1 vs 2 processes, bad values, and the small recipe end to end."""

import io
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from conftest import ROOT, child_env, torchrun_cmd
from selfsup.config import load_recipe
from selfsup.decode import decode_views
from selfsup.models import create_backbone
from selfsup.objectives import build_objective
from selfsup.objectives.jigclu import supcon_loss, tile_features
from selfsup.views import sample_boxes, sample_rng
from tinyrun import run_recipe_and_evaluate, train

RECIPE = "jigclu_small.yaml"
# 16 px montages of 8 px patches; test_resnet with the 3x3 stride-1 stem ends on a 2x2 map
JC = ["model.name=test_resnet", "model.small_stem=true", "augment.size=16", "objective.proj_hidden_dim=64",
      "objective.proj_dim=32"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a 2-core machine shared with other jobs, two OpenMP threads that
    spin-wait for each other made the end-to-end run 40x slower (100 s instead of 2.5 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def test_patches_are_the_four_quadrants_each_augmented_to_half_the_montage():
    """Corner blocks of distinct colours; each quadrant holds exactly one of them. With the
    augmentation reduced to the resize, patch q of image i (cut by the loader's decoder from the
    objective's views) shows its own corner in the right place and grey in the opposite one; the
    patches come quadrant-major, [P0; P1; P2; P3]."""
    obj = build(Identity(), "augment.scale=[1.0,1.0]", "augment.ratio=[1.0,1.0]", "augment.hflip_p=0",
                "augment.jitter_p=0", "augment.gray_p=0", "augment.blur_p=0")
    b = 3
    colours = {"tl": (255, 0, 0), "bl": (0, 0, 255), "tr": (0, 255, 0), "br": (255, 255, 255)}
    img = torch.full((b, 3, 20, 20), 128, dtype=torch.uint8)
    for key, (rows, cols) in {"tl": (slice(0, 4), slice(0, 4)), "bl": (slice(16, 20), slice(0, 4)),
                              "tr": (slice(0, 4), slice(16, 20)), "br": (slice(16, 20), slice(16, 20))}.items():
        img[:, :, rows, cols] = torch.tensor(colours[key], dtype=torch.uint8)[:, None, None]
    img[1] = 255 - img[1]  # images differ, so a patch from the wrong image shows
    views = []
    for i in range(b):
        png = io.BytesIO()
        Image.fromarray(img[i].permute(1, 2, 0).numpy()).save(png, format="PNG")
        boxes = sample_boxes(obj.views(), 20, 20, sample_rng(i))
        views.append(decode_views(png.getvalue(), boxes, obj.views()[0].size))
    p = obj.patches(torch.stack(views), torch.Generator().manual_seed(0))
    assert p.shape == (4 * b, 3, 8, 8)
    mean, std = torch.tensor(obj.augment.mean)[:, None], torch.tensor(obj.augment.std)[:, None]
    px = (p.flatten(2) * std + mean).reshape(p.shape) * 255  # back to 0..255
    corner = {"tl": (0, 0), "bl": (-1, 0), "tr": (0, -1), "br": (-1, -1)}
    for q, key in enumerate(["tl", "bl", "tr", "br"]):  # the official (TL, BL, TR, BR)
        far = {"tl": "br", "br": "tl", "bl": "tr", "tr": "bl"}[key]
        for i in range(b):
            want = torch.tensor(colours[key], dtype=torch.float32)
            want, grey = (255 - want, 127.0) if i == 1 else (want, 128.0)
            patch = px[q * b + i]
            torch.testing.assert_close(patch[:, corner[key][0], corner[key][1]], want, atol=2, rtol=0)
            torch.testing.assert_close(patch[:, corner[far][0], corner[far][1]], torch.full((3,), grey),
                                       atol=2, rtol=0)


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


def test_objective_loss_equals_a_slow_recomputation_from_what_each_tile_shows():
    """Every patch is constant: channel 0 encodes (image i, quadrant q) as 10·i + q, channels 1-2
    are random. Through the identity backbone a tile's feature is its patch's colour, so the
    labels can be read off the features, independently of the permutation arithmetic: clustering
    by image, location by original quadrant, SupCon (per-anchor loop) × τ/τ_base, weighted sum."""
    obj = build(Identity(), "objective.proj_hidden_dim=8", "objective.proj_dim=4", "objective.w_loc=0.5").double()
    n, t = 5, obj.cfg.objective.temperature
    g = torch.Generator().manual_seed(3)
    colour = torch.cat([torch.tensor([10.0 * i + q for q in range(4) for i in range(n)])[:, None],
                        torch.rand(4 * n, 2, generator=g)], 1).double()
    loss, m = obj.loss_from_patches(colour[:, :, None, None].expand(-1, -1, 8, 8))
    perm = obj.permutation_log
    feats = colour[perm]  # row c·n + j = cell c of montage j = G[perm[c·n + j]]
    image, quadrant = (feats[:, 0].round().long() // 10), (feats[:, 0].round().long() % 10)
    z = F.normalize(obj.clu_head(feats), dim=1)
    clu = slow_supcon(z, image, t, torch.arange(4 * n)) * (t / 0.07)
    logits = obj.loc_head(feats)
    loc = torch.stack([-torch.log_softmax(logits[r], 0)[quadrant[r]] for r in range(4 * n)]).mean()
    acc = sum(int(logits[r].argmax() == quadrant[r]) for r in range(4 * n)) / (4 * n)
    torch.testing.assert_close(m["loss_clu"], clu.detach())
    torch.testing.assert_close(m["loss_loc"], loc.detach())
    assert float(m["loc_acc"]) == acc
    torch.testing.assert_close(loss, clu + 0.5 * loc)
    params = list(obj.clu_head.parameters()) + list(obj.loc_head.parameters())
    for a, b in zip(torch.autograd.grad(loss, params), torch.autograd.grad(clu + 0.5 * loc, params)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("model,overrides,cells", [
    ("test_resnet", ["model.small_stem=true", "augment.size=16"], 1),  # 2x2 map
    ("test_resnet", ["model.small_stem=true", "augment.size=32"], 2),  # 4x4 map: 2x2 per tile
    ("test_vit", ["model.small_stem=false", "augment.size=64"], 2),  # 4x4 tokens, class token first
])
def test_real_backbone_tiles_are_the_pooled_cells_of_their_montages(model, overrides, cells):
    """Montages assembled by hand from the permutation (TL G[j], TR G[n+j], BL G[2n+j], BR G[3n+j]),
    encoded by the backbone, and each quarter of the map averaged by hand (ViT tokens indexed by
    hand) equal the objective's tile rows c·n + j."""
    cfg = load_recipe(str(ROOT / "recipes" / RECIPE), [*JC, f"model.name={model}", *overrides])
    torch.manual_seed(0)
    obj = build_objective(cfg, create_backbone(model, None, cfg.model.small_stem)).eval()
    n, half = 3, cfg.augment.size // 2
    p = torch.randn(4 * n, 3, half, half, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats, perm, _ = obj.tiles(p)
        mont = torch.zeros(n, 3, 2 * half, 2 * half)
        for j in range(n):
            for c, (r0, c0) in enumerate([(0, 0), (0, half), (half, 0), (half, half)]):
                mont[j, :, r0:r0 + half, c0:c0 + half] = p[perm[c * n + j]]
        raw = obj.backbone.forward_features(mont)
        for j in range(n):
            for c, (r, q) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
                if raw.ndim == 4:  # (n, C, 2·cells, 2·cells)
                    want = raw[j, :, r * cells:(r + 1) * cells, q * cells:(q + 1) * cells].mean((1, 2))
                else:  # (n, 1 + 16, C): token 1 + row·4 + col
                    want = torch.stack([raw[j, 1 + (r * 2 + dr) * 4 + q * 2 + dc] for dr in range(2)
                                        for dc in range(2)]).mean(0)
                torch.testing.assert_close(feats[c * n + j], want, rtol=1e-5, atol=1e-6)


def test_the_permutation_counter_is_checkpointed_so_a_resume_draws_the_next_permutation():
    first = build(Identity())
    drawn = [first.permutation(24) for _ in range(3)]
    assert not torch.equal(drawn[0], drawn[1])
    state = {k: v for k, v in first.state_dict().items() if k == "perm_calls"}
    assert int(state["perm_calls"]) == 3
    resumed = build(Identity())
    resumed.load_state_dict(state, strict=False)
    assert torch.equal(resumed.permutation(24), first.permutation(24))  # the 4th, not the 1st
    assert torch.equal(build(Identity()).permutation(24), drawn[0])
    other_seed = build(Identity(), "run.seed=1")
    assert not torch.equal(other_seed.permutation(24), drawn[0])


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
    # chance is 0.25 with a standard error of 0.019 over these 8 x 64 tiles: 0.32 is 3.7 sigma
    # above it. (0.346 with the official quadrant geometry, whose 13-of-16-px quadrants overlap
    # more than the truncated 12 px of before, which reached 0.35.)
    assert sum(r["loc_acc"] for r in last) / 8 > 0.32


@pytest.mark.parametrize("args,message", [
    (["augment.size=15"], "augment.size=15 must be even"),
    (["objective.cross_ratio=0.6"], "objective.cross_ratio must be in [0, 0.5), not 0.6"),
    (["objective.temperature=0"], "objective.temperature must be > 0, not 0.0"),
    (["objective.base_temperature=-1"], "objective.base_temperature must be > 0, not -1"),
    (["model.small_stem=false"], "the last feature map of a 16 px montage is 1x1"),
    (["model.name=test_vit", "model.small_stem=false", "model.kwargs.dynamic_img_size=false"],
     "model cannot encode augment.size=16 montages"),
])
def test_bad_jigclu_values_are_one_line_errors(tmp_path, shards, capsys, args, message):
    assert train(RECIPE, shards, tmp_path / "run", *JC, *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("selfsup-train: error:") and message in err and "\n" not in err
