"""Every recipe value is checked at start: one line naming the key, exit 2, nothing trained."""

import math

import pytest
import torch

from conftest import ROOT
from selfsup.cli import train_main
from selfsup.config import RecipeError, load_recipe

TINY = str(ROOT / "recipes" / "tiny.yaml")


@pytest.mark.parametrize("override,key", [
    ("train.batch_size=0", "train.batch_size"),
    ("train.batch_size=-4", "train.batch_size"),
    ("train.grad_accum=0", "train.grad_accum"),
    ("train.log_every=0", "train.log_every"),
    ("train.max_steps=0", "train.max_steps"),  # used to run 200 epochs silently
    ("train.epochs=0", "train.epochs"),
    ("data.shuffle_buffer=0", "data.shuffle_buffer"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.max_corrupt_fraction=1.5", "data.max_corrupt_fraction"),
    ("optim.lr=-1", "optim.lr"),
    ("optim.name=adamz", "optim.name"),
    ("optim.lr_scaling=cubic", "optim.lr_scaling"),
    ("augment.scale=[1.0,0.08]", "augment.scale"),
    ("augment.scale=[0.5]", "augment.scale"),
    ("augment.hflip_p=2", "augment.hflip_p"),
    ("augment.std=[0.2,0.0,0.2]", "augment.std"),
    ("checkpoint.every_steps=-1", "checkpoint.every_steps"),
    ("monitor.k=0", "monitor.k"),
    ("objective.proj_dim=0", "objective.proj_dim"),
    ("train.precision=fp8", "train.precision"),
])
def test_bad_values_are_one_line_naming_the_key(tmp_path, capsys, override, key):
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        load_recipe(TINY, [override])
    rc = train_main([TINY, f"data.train={tmp_path / 'unused'}", f"run.dir={tmp_path / 'run'}", override])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("selfsup-train: error: bad recipe value: " + key)
    assert "\n" not in err and not (tmp_path / "run").exists()


def test_every_shipped_recipe_passes_the_checks():
    for recipe in sorted((ROOT / "recipes").rglob("*.yaml")):
        load_recipe(str(recipe))  # raises on a bad value


def test_ijepa_vit_base_gives_the_papers_schedule_at_batch_2048():
    """I-JEPA ViT-B/16 (official configs): lr 1e-3, start_lr 2e-4, final_lr 1e-6 at a global
    batch of 2048. Only optim.lr follows the batch; warmup_lr and min_lr are absolute (a warmup_lr
    written per 256 started the warm-up 8× too low)."""
    from selfsup.schedules import scaled_lr

    o = load_recipe(str(ROOT / "recipes" / "ijepa_vit_base.yaml")).optim
    assert scaled_lr(o.lr, 2048, o.lr_scaling) == pytest.approx(1e-3)
    assert (o.warmup_lr, o.min_lr, o.warmup_epochs) == (pytest.approx(2e-4), pytest.approx(1e-6), 40)


def official_warmup_cosine(t, total, warmup, start, ref, final):
    """I-JEPA's WarmupCosineSchedule (src/utils/schedulers.py), written out: linear start → ref
    over the warm-up, then a cosine ref → final over the steps that remain."""
    if t < warmup:
        return start + t / warmup * (ref - start)
    progress = (t - warmup) / (total - warmup)
    return final + (ref - final) * 0.5 * (1 + math.cos(math.pi * progress))


def test_the_lr_schedule_is_the_official_warmup_then_cosine():
    """Every recipe's lr follows the official shape: the cosine starts at the peak when the
    warm-up ends (timm's default shape, one cosine over the whole run with the warm-up replacing
    its first steps, would run I-JEPA's middle epochs ~20 % low)."""
    from selfsup.schedules import lr_scheduler

    total, warmup, start, ref, final = 300, 40, 2e-4, 1e-3, 1e-6  # I-JEPA's epochs as steps
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=ref)
    sched = lr_scheduler(opt, total, warmup, start, final)
    ours = []
    for t in range(total + 1):
        sched.step_update(t)
        ours.append(opt.param_groups[0]["lr"])
    theirs = [official_warmup_cosine(t, total, warmup, start, ref, final) for t in range(total + 1)]
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)
    whole_run = final + (ref - final) * 0.5 * (1 + math.cos(math.pi * 170 / total))
    assert whole_run / theirs[170] == pytest.approx(0.79, abs=0.01)  # what timm's default would cost


def test_a_warmup_that_would_run_downwards_is_said(tmp_path, capsys):
    """warmup_lr is absolute and lr follows the batch: ijepa_vit_base.yaml on one process of 128
    peaks at 6.25e-5, under its 2e-4 warm-up start."""
    from selfsup.recipe_checks import warmup_notes

    o = load_recipe(str(ROOT / "recipes" / "ijepa_vit_base.yaml")).optim
    assert warmup_notes(o, global_batch=2048) == []
    (note,) = warmup_notes(o, global_batch=128)
    assert "optim.warmup_lr=0.0002" in note and "6.25e-05" in note and "global batch 128" in note
