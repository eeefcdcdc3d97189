"""I-JEPA: multi-block masks (== lightly's collator given the same seeds, plus the paper's
invariants), target encoder (no gradient, trainer EMA, linear 0.996 → 1 schedule), layer-normed
targets, predictor shapes, exact resume, and the recipe end to end."""

import json
import math
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from lightly.data import IJEPAMaskCollator
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import ROOT
from selfsup.config import load_recipe
from selfsup.models import create_backbone
from selfsup.objectives import build_objective
from selfsup.objectives.ijepa_masks import MultiBlockMasks
from selfsup.schedules import EMA
from tinyrun import TINY_NO_HEAD, run_recipe_and_evaluate, train

RECIPE = "ijepa_vit_tiny.yaml"
# an 8x8 grid of 2 px patches on 16 px images, 2 blocks of width 64, a 1-block predictor
IJ = ["model.name=test_vit", "model.kwargs.img_size=16", "model.kwargs.patch_size=2",
      "model.kwargs.depth=2", "model.kwargs.embed_dim=64", "model.kwargs.num_heads=2",
      "objective.pred_depth=1", "objective.pred_dim=32", "objective.min_keep=4",
      "optim.weight_decay=0.04", "optim.weight_decay_end=0.4", "optim.lr=2e-3"]
PAPER = dict(num_targets=4, target_scale=(0.15, 0.2), target_aspect=(0.75, 1.5), num_context=1,
             context_scale=(0.85, 1.0), min_keep=10, allow_overlap=False)


def build(*overrides):
    cfg = load_recipe(str(ROOT / "recipes" / RECIPE), [*TINY_NO_HEAD, *IJ, *overrides])
    torch.manual_seed(0)
    from omegaconf import OmegaConf
    return build_objective(cfg, create_backbone(cfg.model.name, OmegaConf.to_container(cfg.model.kwargs)))


# ---------------------------------------------------------------------------------- masks ----
@pytest.mark.parametrize("grid,seed,batch,overlap,context_scale,min_keep,relaxed", [
    (14, 0, 6, False, (0.85, 1.0), 10, 0), (14, 5, 32, False, (0.85, 1.0), 10, 0),
    (10, 3, 6, False, (0.85, 1.0), 10, 0), (14, 7, 16, True, (0.85, 1.0), 10, 0),
    (8, 1, 16, False, (0.25, 0.3), 4, 1),  # a context too small once: one constraint dropped
])
def test_masks_equal_lightlys_collator_given_the_same_seeds(grid, seed, batch, overlap, context_scale,
                                                            min_keep, relaxed):
    """lightly draws block sizes from a generator seeded by its step counter and positions from the
    global RNG; ours takes both generators explicitly and must make the very same draws."""
    collator = IJEPAMaskCollator(input_size=grid * 16, patch_size=16, enc_mask_scale=context_scale,
                                 pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5), nenc=1,
                                 npred=4, min_keep=min_keep, allow_overlap=overlap)
    collator._itr_counter.value = seed - 1  # its next step() returns `seed`
    torch.manual_seed(100 + seed)
    with warnings.catch_warnings():  # lightly warns where it relaxes a constraint
        warnings.simplefilter("ignore")
        _, enc, pred = collator([torch.zeros(1)] * batch)
    ours = MultiBlockMasks((grid, grid), **{**PAPER, "context_scale": context_scale,
                                            "min_keep": min_keep, "allow_overlap": overlap})
    ctx, tgt = ours(batch, torch.Generator().manual_seed(seed), torch.Generator().manual_seed(100 + seed))
    assert len(ctx) == len(enc) == 1 and len(tgt) == len(pred) == 4
    for a, b in zip(ctx + tgt, enc + pred):
        assert a.dtype == torch.int64 and torch.equal(a, b)
    assert ours.relaxed == relaxed


def _rect(idx: torch.Tensor, w: int):
    rows, cols = (idx // w).tolist(), (idx % w).tolist()
    h0, h1, w0, w1 = min(rows), max(rows), min(cols), max(cols)
    return h1 - h0 + 1, w1 - w0 + 1, len(idx) == (h1 - h0 + 1) * (w1 - w0 + 1), h1, w1


def test_masks_follow_the_paper_settings():
    g = 16  # ViT-H/14 at 224 px
    sampler = MultiBlockMasks((g, g), **PAPER)
    sizes = set()
    for seed in range(20):
        ctx, tgt = sampler(8, torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed))
        assert len(tgt) == 4 and len(ctx) == 1
        assert ctx[0].shape[0] == 8 and all(t.shape[0] == 8 for t in tgt)  # equal lengths: stacked
        shapes = set()
        for i in range(8):
            targets = set()
            for t in tgt:
                h, w, full, last_row, last_col = _rect(t[i], g)
                assert full and last_row < g - 1 and last_col < g - 1  # randint excludes H - h
                shapes.add((h, w))
                targets |= set(t[i].tolist())
            assert not targets & set(ctx[0][i].tolist())  # context ∩ targets = ∅
            assert len(ctx[0][i]) > 10 and len(set(ctx[0][i].tolist())) == len(ctx[0][i])
        assert len(shapes) == 1  # one target size per batch
        h, w = shapes.pop()
        sizes.add((h, w))
        assert 0.15 * g * g - g <= h * w <= 0.2 * g * g + g  # scale, up to rounding
        assert 0.75 - 0.2 <= h / w <= 1.5 + 0.3  # aspect, up to rounding
    assert len(sizes) > 3  # sizes do vary between batches
    assert sampler.relaxed == 0


def test_masks_are_reproducible_from_their_seeds():
    s = MultiBlockMasks((8, 8), **{**PAPER, "min_keep": 4})
    a = s(5, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
    b = s(5, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
    c = s(5, torch.Generator().manual_seed(1), torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a[0] + a[1], c[0] + c[1]))


# --------------------------------------------------------------------- encoders and loss ----
def test_target_encoder_gets_no_gradient_and_moves_only_by_the_trainers_ema():
    obj = build()
    before = {k: v.clone() for k, v in obj.target.state_dict().items()}
    loss, _ = obj({"image": torch.randint(0, 256, (6, 1, 3, 16, 16), dtype=torch.uint8)},
                  torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in obj.target.parameters())
    assert obj.encoder.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(torch.equal(before[k], v) for k, v in obj.target.state_dict().items())
    with torch.no_grad():
        for p in obj.encoder.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    m = obj.momentum(0.25)
    assert m == pytest.approx(0.996 + 0.004 * 0.25)
    [(online, target)] = obj.momentum_pairs()
    EMA([(online, target)]).update(m)
    online_sd = obj.encoder.state_dict()
    for k, v in obj.target.state_dict().items():
        torch.testing.assert_close(v, m * before[k] + (1 - m) * online_sd[k], rtol=0, atol=1e-6)
    assert [obj.momentum(p) for p in (0.0, 0.5, 1.0)] == pytest.approx([0.996, 0.998, 1.0])


def test_targets_are_layer_normed_and_predictions_have_the_papers_shape():
    obj = build()
    images = torch.randn(5, 3, 16, 16)
    ctx, tgt = obj.sample_masks(5, torch.Generator().manual_seed(0))
    h = obj.targets(images, tgt, repeat=1)
    n_tgt, d = tgt[0].shape[1], obj.backbone.embed_dim
    assert h.shape == (4 * 5, n_tgt, d)
    torch.testing.assert_close(h.mean(-1), torch.zeros(20, n_tgt), atol=1e-5, rtol=0)
    torch.testing.assert_close(h.var(-1, unbiased=False), torch.ones(20, n_tgt), atol=1e-3, rtol=0)
    # row j·B + i holds target block j of image i: the full-image target features at its indices
    full = F.layer_norm(obj.target.encode(images), (d,))
    torch.testing.assert_close(h[2 * 5 + 3], full[3, tgt[2][3]], atol=1e-5, rtol=0)
    z = obj.predict(images, ctx, tgt)
    assert z.shape == h.shape
    # the context encoder only sees its tokens: changing a target-only patch leaves z unchanged
    hidden = sorted(set(range(64)) - set(ctx[0][0].tolist()))[0]
    r, c = divmod(hidden, 8)
    edited = images.clone()
    edited[0, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2] += 5.0
    torch.testing.assert_close(obj.predict(edited, ctx, tgt), z)
    # smooth L1 (official) vs MSE (paper)
    loss, _ = obj.loss_from_masks(images, ctx, tgt)
    torch.testing.assert_close(loss, F.smooth_l1_loss(z, h), atol=1e-6, rtol=0)
    mse = build("objective.loss=mse")
    mse.load_state_dict(obj.state_dict())
    torch.testing.assert_close(mse.loss_from_masks(images, ctx, tgt)[0], F.mse_loss(z, h), atol=1e-6, rtol=0)


def test_backbone_is_one_module_saved_once_and_exported_as_mean_of_patch_tokens():
    obj = build()
    # the paper evaluates the target (EMA) encoder: exported and monitored by default
    assert obj.backbone is obj.target.vit and obj.export_pool == "mean_patch"
    context = build("objective.export=context")
    assert context.backbone is context.encoder.vit
    assert not any(k.startswith("backbone.") for k in obj.state_dict())
    assert not obj.encoder.vit.pos_embed.requires_grad  # fixed sin-cos, as the official encoder


def trunc_normal_like(w: torch.Tensor, std: float = 0.02) -> bool:
    """A draw of N(0, std) truncated at ±2 (absolute): its sample std within 15 % of std."""
    return abs(w.std().item() / std - 1) < 0.15 and w.abs().max().item() <= 2


@pytest.mark.parametrize("rescale", [False, True])
def test_predictor_and_encoder_are_initialised_as_the_official_code(rescale):
    """Official ``init_model``: every Linear truncated normal σ 0.02 with zero bias, LayerNorm
    1 / 0, the predictor's mask token truncated normal σ 0.02; lightly's predictor keeps PyTorch's
    Linear init (σ ≈ 0.1 here, biases non-zero) and a zero mask token. ``fix_init_weight``'s
    √(2ℓ) rescaling is undone by the official ``init_model``; ``rescale_init`` applies it."""
    obj = build(f"objective.rescale_init={rescale}")
    pred = obj.predictor
    linears = [m for m in pred.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 6  # embed, qkv, proj, fc1, fc2, out
    for m in linears:
        assert not m.bias.any()
        rescaled = rescale and (m is pred.decoder.blocks[0].attn.proj or m is pred.decoder.blocks[0].mlp.fc2)
        assert trunc_normal_like(m.weight, 0.02 / (2 ** 0.5 if rescaled else 1)), m
    norms = [m for m in pred.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(bool((m.weight == 1).all() and (m.bias == 0).all()) for m in norms)
    assert trunc_normal_like(pred.decoder.mask_token, 0.02)
    vit = obj.encoder.vit
    assert trunc_normal_like(vit.patch_embed.proj.weight) and not vit.patch_embed.proj.bias.any()
    assert trunc_normal_like(vit.blocks[1].attn.proj.weight, 0.02 / (2 if rescale else 1))
    assert trunc_normal_like(vit.blocks[1].mlp.fc2.weight, 0.02 / (2 if rescale else 1))


# ---------------------------------------------------------------------- trainer end to end ----
def test_resume_restores_target_encoder_masks_and_schedules_exactly(tmp_path, shards):
    common = ["train.max_steps=6", "checkpoint.every_steps=3", "checkpoint.keep=5", *IJ]
    full = tmp_path / "full"
    assert train(RECIPE, shards, full, *common, tiny=TINY_NO_HEAD) == 0
    half = tmp_path / "half"
    (half / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-000000003", half / "checkpoints" / "step-000000003")
    assert train(RECIPE, shards, half, *common, "resume=auto", tiny=TINY_NO_HEAD) == 0

    def state(run, step):
        return load_file(str(run / "checkpoints" / f"step-{step:09d}" / "model.safetensors"))

    a, b, mid = state(full, 6), state(half, 6), state(full, 3)
    assert int(a["mask_calls"]) == int(b["mask_calls"]) == 6 and int(mid["mask_calls"]) == 3
    for name in a:  # target encoder, predictor, context encoder
        assert torch.equal(a[name], b[name]), name
    assert not torch.equal(mid["target.vit.blocks.0.attn.qkv.weight"], a["target.vit.blocks.0.attn.qkv.weight"])

    def log(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    # the first EMA update uses exactly the start momentum (the official scheduler's first value)
    assert log(full)[0]["momentum"] == 0.996
    assert [r["momentum"] for r in log(full)] == pytest.approx([0.996 + 0.004 * s / 6 for s in range(6)])
    assert [r["loss"] for r in log(full)][3:] == [r["loss"] for r in log(half)]


def test_weight_decay_rises_on_a_cosine_and_skips_biases_and_norms(tmp_path, shards):
    from selfsup.trainer import Trainer

    cfg = load_recipe(str(ROOT / "recipes" / RECIPE), [*TINY_NO_HEAD, *IJ, f"data.train={shards}",
                                                       f"run.dir={tmp_path / 'run'}", "train.max_steps=4"])
    t = Trainer(cfg)
    decayed = [g for g in t.optimizer.param_groups if g["weight_decay"] > 0]
    assert decayed and all(p.ndim > 1 for g in decayed for p in g["params"])
    from selfsup.schedules import set_weight_decay
    assert set_weight_decay(t.optimizer, 0.04, 0.4, 0.0) == pytest.approx(0.04)
    assert set_weight_decay(t.optimizer, 0.04, 0.4, 0.5) == pytest.approx(0.22)
    assert set_weight_decay(t.optimizer, 0.04, 0.4, 1.0) == pytest.approx(0.4)
    assert all(g["weight_decay"] == 0 for g in t.optimizer.param_groups if g not in decayed)


def test_ijepa_recipe_trains_and_its_export_evaluates(tmp_path):
    curve, knn = run_recipe_and_evaluate(tmp_path, RECIPE, *IJ, tiny=TINY_NO_HEAD, epochs=12)
    assert all(math.isfinite(x) for x in curve) and 0.0 <= knn <= 1.0
    with safe_open(str(tmp_path / "run" / "export" / "backbone.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["selfsup"])
    assert meta["pool"] == "mean_patch" and meta["objective"] == "ijepa" and meta["input_size"] == 16
    # the export is the target (EMA) encoder's ViT, not the context encoder's
    exported = load_file(str(tmp_path / "run" / "export" / "backbone.safetensors"))
    [ckpt] = (tmp_path / "run" / "checkpoints").iterdir()
    state = load_file(str(ckpt / "model.safetensors"))
    name = "blocks.0.attn.qkv.weight"
    assert torch.equal(exported[name], state[f"target.vit.{name}"])
    assert not torch.equal(exported[name], state[f"encoder.vit.{name}"])


@pytest.mark.parametrize("patch,chans", [(2, 3), (4, 1), (16, 3)])
def test_fan_in_patch_init_keeps_the_papers_output_scale(patch, chans):
    """``patch_embed_init: fan_in``: σ = 0.02·√(768 / fan-in), so a patch of unit-variance pixels
    is embedded with the spread σ 0.02 gives a 16×16×3 patch (0.02·√768 ≈ 0.554), whatever the
    patch; at 16×16×3 it is the official σ 0.02 itself. The official init keeps σ 0.02."""
    from selfsup.objectives.ijepa import fan_in_patch_init

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(chans, 384, patch, stride=patch, bias=False)
    fan_in = chans * patch * patch
    fan_in_patch_init(conv)
    assert trunc_normal_like(conv.weight, 0.02 * (768 / fan_in) ** 0.5)
    x = torch.randn(512, chans, patch, patch)
    assert conv(x).std().item() == pytest.approx(0.02 * 768 ** 0.5, rel=0.1)
    official = build().encoder.vit.patch_embed.proj.weight  # 2x2x3: σ 0.02 stays
    fan = build("objective.patch_embed_init=fan_in").encoder.vit.patch_embed.proj.weight
    assert trunc_normal_like(official) and trunc_normal_like(fan, 0.02 * 8)  # √(768/12) = 8


@pytest.mark.parametrize("args,message", [
    (["model.kwargs.class_token=true"], "model.kwargs.class_token=false"),
    (["model.kwargs.fc_norm=true"], "model.kwargs.fc_norm=false"),
    (["augment.size=32"], "augment.size=32 but the ViT is built for 16 px"),
    (["objective.loss=l1"], "objective.loss must be one of smooth_l1, mse"),
    (["objective.export=online"], "objective.export must be one of target, context"),
    (["objective.patch_embed_init=xavier"], "objective.patch_embed_init must be one of official, fan_in"),
    (["objective.target_scale=[0.3,0.2]"], "objective.target_scale must be [low, high]"),
    (["objective.pred_dim=33"], "objective.pred_dim=33 is not divisible"),
    (["objective.min_keep=12"], "target blocks can be as small as 9 patches on the 8x8 grid"),
])
def test_bad_ijepa_values_are_one_line_errors(tmp_path, shards, capsys, args, message):
    assert train(RECIPE, shards, tmp_path / "run", *IJ, *args, tiny=TINY_NO_HEAD) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("selfsup-train: error:") and message in err and "\n" not in err


def test_a_cnn_backbone_is_refused_with_one_line():
    from selfsup.config import RecipeError
    from selfsup.objectives.ijepa import IJEPA

    cfg = load_recipe(str(ROOT / "recipes" / RECIPE), [*TINY_NO_HEAD, *IJ])
    with pytest.raises(RecipeError, match="objective ijepa needs a timm ViT .model.name: vit_.., not ResNet"):
        IJEPA(cfg, create_backbone("test_resnet"))
