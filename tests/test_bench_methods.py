"""bench/methods.py's bookkeeping: pairs are differenced by seed, and --no-raw keeps a cached baseline."""

import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import methods  # noqa: E402  (bench/: the method table)


def row(objective, seed, knn, linear, images=120000):
    return {"objective": objective, "seed": seed, "batch": 256, "images": images, "knn20": knn,
            "linear": linear, "train_s": 60.0}


def test_pairs_are_differenced_by_seed_and_unpaired_rows_left_out():
    rows = [row("moco", 0, 0.80, 0.84), row("moco", 1, 0.79, 0.83), row("moco", 2, 0.78, 0.82),
            row("moco_plainbn", 1, 0.775, 0.827), row("moco_plainbn", 0, 0.79, 0.835),
            row("moco_plainbn", 3, 0.10, 0.10),              # no moco seed 3: not a pair
            row("moco_plainbn", 2, 0.10, 0.10, images=30000)]  # another budget: not a pair
    text = methods.pairs_table(rows)
    line = next(x for x in text.splitlines() if x.startswith("| moco − moco_plainbn"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] == "0, 1"
    assert cells[3:] == ["+1.00 / +1.50", "+1.25", "+0.50 / +0.30", "+0.40"]
    assert "mochi" not in text  # pairs with neither side run are left out
    assert methods.pairs_table([row("moco", 0, 0.8, 0.8)]) == ""


def test_no_raw_keeps_a_cached_baseline_and_computes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(methods.subprocess, "run", lambda *a, **k: pytest.fail("ran the raw-pixel probes"))
    assert methods.raw_pixels(tmp_path, "train", "val", compute=False) is None
    (tmp_path / "raw-pixels.json").write_text(json.dumps({"knn20": 0.8, "linear": 0.82}))
    assert methods.raw_pixels(tmp_path, "train", "val", compute=False) == {"knn20": 0.8, "linear": 0.82}
    assert methods.raw_pixels(tmp_path, "train", "val") == {"knn20": 0.8, "linear": 0.82}  # cached
    assert "| raw pixels | – | – | – | – | 80.00 | 82.00 | – |" in methods.table([], {"knn20": 0.8, "linear": 0.82})
