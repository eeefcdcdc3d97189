"""The recipe schema is the one statement of each key: docs/recipe.md is generated from it, every
key has a doc line, and validation and resume read their rules from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfsup.config import RecipeError, load_recipe
from selfsup.recipe_doc import render, undocumented
from selfsup.rundir import resume_classes

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.yaml")


def test_docs_recipe_md_is_the_generated_reference():
    assert (ROOT / "docs" / "recipe.md").read_text() == render(), \
        "docs/recipe.md is stale: run `make recipe-doc`"


def test_every_key_has_a_doc_line():
    assert undocumented() == []


def test_the_cli_prints_the_reference(capsys):
    from selfsup.cli import train_main

    assert train_main(["--explain-keys"]) == 0
    out = capsys.readouterr().out
    assert out == render() and "| `optim.lr` | `0.001` | > 0 | accept |" in out
    assert "## `objective.name: moco`" in out and "`objective.mochi.n`" in out


@pytest.mark.parametrize("override,message", [
    ("optim.lr=0", "optim.lr must be > 0, not 0"),
    ("data.decode=gpu", "data.decode must be one of cpu, device, not 'gpu'"),
    ("augment.scale=[0.9,0.1]", "augment.scale must be [low, high] with 0 < low <= high <= 1"),
    ("optim.momentum=1.0", "optim.momentum must be in [0, 1), not 1.0"),
    ("objective.proj_dim=0", "objective.proj_dim must be >= 1, not 0"),
    ("objective.mochi.start_epoch=-2", "objective.mochi.start_epoch must be >= 0, not -2"),
])
def test_a_keys_rule_is_one_line_naming_it(override, message):
    with pytest.raises(RecipeError) as e:
        load_recipe(TINY, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_an_objectives_own_rules_are_applied_before_it_is_built():
    with pytest.raises(RecipeError, match="objective.queue_size must be >= 1, not 0"):
        load_recipe(TINY, ["objective.name=moco", "objective.queue_size=0"])
    with pytest.raises(RecipeError, match="objective.export must be one of target, context"):
        load_recipe(str(ROOT / "recipes" / "ijepa_vit_tiny.yaml"), ["objective.export=online"])


def test_resume_classes_come_from_the_schema():
    free, structural = resume_classes("moco")
    assert set(structural) == {"model.name", "model.kwargs", "model.small_stem", "optim.name", "objective.name",
                               "optim.layer_decay"}  # layer decay: the optimizer state's param groups
    assert {"run.dir", "resume", "train.log_every", "log.trackers", "checkpoint.keep", "monitor.k",
            "data.max_corrupt_fraction", "checkpoint.keep_best", "monitor.min_vs_init"} <= set(free)
    assert "optim.lr" not in free and "objective.queue_size" not in free + structural
