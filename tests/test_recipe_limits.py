"""Issue 30 (D): values that pass their type and sign checks but make no sense are refused at
start with their key and the limit: a min_lr above the peak lr (the cosine then climbs) and a
view size no export may have (100000 was reported as "none of the images could be decoded")."""

import json

from conftest import ROOT, write_shards
from selfsup.cli import train_main
from selfsup.config import RecipeError, load_recipe
from selfsup.recipe_checks import schedule_problems

TINY = str(ROOT / "recipes" / "tiny.yaml")


def last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_an_absurd_view_size_is_refused_with_its_limit(tmp_path, capsys):
    try:
        load_recipe(TINY, ["augment.size=100000"])
    except RecipeError as e:
        assert "augment.size must be in [2, 2048], not 100000" in str(e)
    else:
        raise AssertionError("augment.size=100000 accepted")
    load_recipe(TINY, ["augment.size=2048"])  # the limit itself is fine
    assert train_main([TINY, f"run.dir={tmp_path / 'run'}", "augment.size=100000"]) == 2
    assert last_error(capsys).startswith("selfsup-train: error: bad recipe value: augment.size")


def test_min_lr_above_the_peak_is_refused_at_the_global_batch_of_the_run(tmp_path, shards, capsys):
    cfg = load_recipe(TINY, ["optim.lr=0.1", "optim.min_lr=0.08", "optim.lr_scaling=linear"])
    # the peak follows the global batch: 0.1 * 128 / 256 = 0.05 on one process, 0.4 on 8 of 128
    assert schedule_problems(cfg.optim, 1024) == []
    (problem,) = schedule_problems(cfg.optim, 128)
    assert problem == ("optim.min_lr must be <= the peak lr 0.05 (optim.lr=0.1 scaled linear at "
                       "global batch 128), not 0.08")
    run = tmp_path / "run"
    assert train_main([TINY, f"data.train={shards}", f"run.dir={run}", "train.max_steps=2",
                       "optim.lr_scaling=none", "optim.lr=0.01", "optim.min_lr=0.5"]) == 2
    err = last_error(capsys)
    assert err.startswith("selfsup-train: error: bad recipe value: optim.min_lr must be <= the peak lr 0.01")
    assert not (run / "metrics.jsonl").exists()  # nothing trained
    assert train_main([TINY, f"data.train={shards}", f"run.dir={tmp_path / 'ok'}", "train.max_steps=2",
                       "optim.lr_scaling=none", "optim.lr=0.01", "optim.min_lr=0.01"]) == 0
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()]
    assert max(lrs) <= 0.01 * (1 + 1e-6)
