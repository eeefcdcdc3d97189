"""Low-shot protocols: class-balanced subsets seeded from the labels (the same for every
checkpoint), choices made inside the subset, mean ± std over subsets, results.json layout."""

import json

import pytest
import torch

from selfsup_eval.cli import main
from selfsup_io.knn import knn_classify, topk_accuracy
from selfsup_eval.lowshot import draw_subset, lowshot, protocols, stratified_holdout, subset_seed
from test_eval_fixtures import clustered, export, write_split


def test_protocol_names_and_class_balanced_subsets():
    assert protocols([1, 10], [0.01, 0.5]) == [("1-shot", "shots", 1), ("10-shot", "shots", 10),
                                               ("1%", "fraction", 0.01), ("50%", "fraction", 0.5)]
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    sub = draw_subset(y, "shots", 4, seed=3)
    assert torch.bincount(y[sub]).tolist() == [4, 4, 4] and len(set(sub.tolist())) == 12
    frac = draw_subset(y, "fraction", 0.1, seed=3)  # stratified: round(0.1 * n_c) per class
    assert torch.bincount(y[frac]).tolist() == [5, 3, 2]
    assert torch.equal(draw_subset(y, "shots", 4, seed=3), sub)
    assert not torch.equal(draw_subset(y, "shots", 4, seed=4), sub)
    with pytest.raises(ValueError, match="class 2 has only 20"):
        draw_subset(y, "shots", 25, seed=0)


def test_seeds_depend_on_the_labels_protocol_and_draw_only():
    y = torch.arange(40) % 4
    a = subset_seed(y, "10-shot", 0)
    assert a == subset_seed(y.clone(), "10-shot", 0)  # any checkpoint with these labels
    assert len({a, subset_seed(y, "10-shot", 1), subset_seed(y, "1-shot", 0), subset_seed(y.flip(0), "10-shot", 0)}) == 4


def test_the_hold_out_leaves_every_class_an_image():
    y = torch.tensor([0] * 10 + [1] * 2 + [2])
    hold = stratified_holdout(y, seed=0)
    assert torch.bincount(y[hold], minlength=3).tolist() == [1, 1, 0]
    assert len(stratified_holdout(torch.arange(5), seed=0)) == 0  # 1-shot: nothing to spare


def test_lowshot_figures_are_the_mean_and_std_of_independent_runs():
    xtr, ytr = clustered(300, d=10, c=5, seed=0, spread=0.5)
    xva, yva = clustered(100, d=10, c=5, seed=1, spread=0.5)
    f = ({"features": xtr, "label": ytr}, {"features": xva, "label": yva})
    res = lowshot(*f, protocols([1, 8]), subsets=3, ks=(20,))
    for name, shots in (("1-shot", 1), ("8-shot", 8)):
        r = res[name]
        assert r["subsets"] == 3 and r["train_samples"] == 5 * shots and r["knn_k"] == min(20, 5 * shots)
        runs = []
        for i in range(3):  # the k-NN runs, recomputed from the documented seeds
            sub = draw_subset(ytr, "shots", shots, subset_seed(ytr, name, i))
            k = min(20, len(sub))
            runs.append(topk_accuracy(knn_classify(xtr[sub], ytr[sub], xva, ks=(k,))[k], yva, 1))
        assert r["knn"]["runs"] == runs
        for m in ("knn", "linear", "knn_linear"):
            t = torch.tensor(r[m]["runs"], dtype=torch.float64)
            assert len(t) == 3 and r[m]["mean"] == pytest.approx(t.mean().item())
            assert r[m]["std"] == pytest.approx(t.std().item())
    assert res["8-shot"]["linear"]["mean"] > res["1-shot"]["linear"]["mean"] - 0.05  # more labels help


def test_the_cli_writes_lowshot_and_every_checkpoint_sees_the_same_subsets(tmp_path, capsys, monkeypatch):
    root = tmp_path / "d"
    train, val = write_split(root, "train", 48, shard_size=16), write_split(root, "val", 12, seed=1)
    a, b = export(tmp_path / "a.safetensors", seed=1), export(tmp_path / "b.safetensors", seed=2)
    import selfsup_eval.lowshot as low

    drawn = []
    original = low.draw_subset
    monkeypatch.setattr(low, "draw_subset", lambda *args: drawn.append(original(*args).tolist()) or original(*args))
    out = tmp_path / "out"
    assert main(["all", str(a), str(b), "--train", str(train), "--val", str(val), "--k", "3",
                 "--shots", "2", "--fraction", "0.5", "--subsets", "2", "--out", str(out), "--no-cache"]) == 0
    assert len(drawn) == 8 and drawn[:4] == drawn[4:]  # checkpoint b drew checkpoint a's subsets
    assert drawn[0] != drawn[1]  # two different subsets of one protocol
    records = json.loads((out / "results.json").read_text())
    for r in records:
        assert set(r["lowshot"]) == {"2-shot", "50%"}
        assert set(r["lowshot"]["2-shot"]) >= {"knn", "linear", "knn_linear"}
        assert set(r["lowshot"]["2-shot"]["knn"]) == {"mean", "std", "runs"}
        assert r["lowshot"]["50%"]["train_samples"] == 24
        assert set(r["knn_linear"]) >= {"top1", "top5", "lambda", "k"}
    shown = capsys.readouterr().out
    assert "low-shot: mean ± std over 2 subset(s)" in shown and " ± " in shown
    header = (out / "results.csv").read_text().splitlines()[0]
    assert "lowshot_2-shot_knn_linear_mean" in header and "knn_linear_lambda" in header
