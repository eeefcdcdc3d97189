"""selfsup_eval: k-NN and linear probe against independent references, extraction, CLI."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

from conftest import ROOT, child_env, torchrun_cmd, write_shards
from selfsup.checkpoint import export_backbone
from selfsup.models import create_backbone
from selfsup_eval import features as feat_mod
from selfsup_eval.checkpoint import load_backbone
from selfsup_eval.cli import main
from selfsup_io.knn import knn_classify, topk_accuracy
from selfsup_eval.linear import linear_probe


def clustered(n, d=16, c=5, seed=0, spread=1.5):
    """Gaussian mixture: the same centres for every seed, new samples per seed."""
    centres = torch.randn(c, d, generator=torch.Generator().manual_seed(1234)) * spread
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    return centres[y] + torch.randn(n, d, generator=g), y


def test_knn_equals_a_brute_force_loop_and_scikit_learn():
    from sklearn.neighbors import KNeighborsClassifier

    xtr, ytr = clustered(300, seed=0)
    xq, yq = clustered(60, seed=1)
    ranked = knn_classify(xtr, ytr, xq, ks=(1, 7, 20), temperature=0.07, chunk_size=16)
    ntr = xtr / xtr.norm(dim=1, keepdim=True)
    for k in (1, 7, 20):
        for i in range(len(xq)):  # the obviously-correct loop
            q = xq[i] / xq[i].norm()
            sims = [(float(q @ ntr[j]), j) for j in range(len(ntr))]
            sims.sort(reverse=True)
            votes = {}
            for s, j in sims[:k]:
                votes[int(ytr[j])] = votes.get(int(ytr[j]), 0.0) + math.exp(s / 0.07)
            assert int(ranked[k][i, 0]) == max(votes, key=votes.get)
        sk = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric="cosine",
                                  weights=lambda d: np.exp((1 - d) / 0.07)).fit(xtr.numpy(), ytr.numpy())
        np.testing.assert_array_equal(ranked[k][:, 0].numpy(), sk.predict(xq.numpy()))
    assert 0.5 < topk_accuracy(ranked[20], yq, 1) <= topk_accuracy(ranked[20], yq, 5)


def test_knn_k_larger_than_train_set_is_an_error():
    with pytest.raises(ValueError, match="larger than the train set"):
        knn_classify(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), torch.randn(2, 3), ks=(10,))


def test_linear_probe_matches_scikit_learn_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    xtr, ytr = clustered(1500, d=20, c=6, seed=2, spread=0.6)
    xva, yva = clustered(600, d=20, c=6, seed=3, spread=0.6)
    ours = linear_probe(xtr, ytr, xva, yva)
    mean, std = xtr.mean(0), xtr.std(0)
    sk = LogisticRegression(max_iter=2000).fit(((xtr - mean) / std).numpy(), ytr.numpy())
    sk_acc = (sk.predict(((xva - mean) / std).numpy()) == yva.numpy()).mean()
    assert 0.3 < sk_acc < 0.99  # a problem that is neither trivial nor hopeless
    assert abs(ours["top1"] - sk_acc) <= 0.005
    assert ours["top5"] >= ours["top1"] and ours["wd"] in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)


def export(tmp_path, name="resnet10t", step=1, small_stem=False, pool="head", kwargs=None, seed=0,
           run="run", size=16):
    torch.manual_seed(seed)
    model = create_backbone(name, kwargs, small_stem)
    with torch.no_grad():  # non-trivial BN statistics, so eval vs train mode matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    meta = {"model_name": name, "model_kwargs": {**(kwargs or {}), "num_classes": 0},
            "small_stem": small_stem, "input_size": size, "mean": [0.5] * 3, "std": [0.25] * 3,
            "feature_dim": model.num_features, "pool": pool, "objective": "simclr", "step": step}
    return export_backbone(model, tmp_path / run, meta)


def test_features_of_a_sample_do_not_depend_on_its_batch(tmp_path):
    bb = load_backbone(str(export(tmp_path)))
    x = torch.randn(8, 3, 16, 16)
    alone = torch.cat([bb.features(x[i:i + 1]) for i in range(8)])
    together = bb.features(x)
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)
    bb.model.train()
    assert not torch.allclose(bb.features(x)[:2], bb.features(x[:2]), atol=1e-3)  # would differ


def test_small_stem_and_mean_patch_exports_load(tmp_path):
    small = load_backbone(str(export(tmp_path, "resnet18", small_stem=True, run="a")))
    assert small.features(torch.randn(2, 3, 16, 16)).shape == (2, 512)
    assert small.model.conv1.stride == (1, 1)
    vit_kwargs = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2,
                  "class_token": False, "global_pool": "avg"}
    vit = load_backbone(str(export(tmp_path, "vit_tiny_patch16_224", pool="mean_patch", kwargs=vit_kwargs, run="b")))
    x = torch.randn(2, 3, 16, 16)
    tokens = vit.model.forward_features(x)
    torch.testing.assert_close(vit.features(x), tokens.mean(1))


@pytest.fixture
def data(tmp_path):
    train = write_shards(tmp_path / "s", n=60, split="train", shard_size=16, size=16, classes=3)
    val = write_shards(tmp_path / "s", n=21, split="val", shard_size=16, size=16, classes=3, seed=1)
    return train, val


def test_two_processes_extract_exactly_the_features_of_one(tmp_path, data):
    ckpt = export(tmp_path)
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    script = str(ROOT / "tests" / "scripts" / "extract.py")
    env = child_env()
    subprocess.run([sys.executable, script, str(ckpt), str(data[0]), str(one)], env=env, check=True,
                   capture_output=True, timeout=300)
    r = subprocess.run(torchrun_cmd(2, script, str(ckpt), str(data[0]), str(two)), env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = torch.load(one), torch.load(two)
    assert a["key"] == b["key"] and len(a["key"]) == 60 and len(set(a["key"])) == 60
    assert torch.equal(a["label"], b["label"])
    torch.testing.assert_close(a["features"], b["features"], atol=1e-6, rtol=1e-6)


def test_all_on_a_run_directory_writes_ordered_results_and_plot(tmp_path, data, capsys):
    for step in (20, 5):
        export(tmp_path, step=step, seed=step)
    out = tmp_path / "out"
    rc = main(["all", "--baseline", "raw-pixels", str(tmp_path / "run"), "--train", str(data[0]), "--val", str(data[1]),
               "--k", "3", "10", "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    records = json.loads((out / "results.json").read_text())
    assert [r["step"] for r in records] == [0, 5, 20] and records[0]["path"] == "raw-pixels"
    assert set(records[1]["knn"]) == {"k=3", "k=10"} and 0 <= records[1]["linear"]["top1"] <= 1
    assert records[0]["knn"]["k=3"] > 0.9  # the blobs are separable in pixel space
    assert "linear" not in records[0]  # a baseline gets k-NN only
    assert (out / "results.csv").read_text().count("\n") == 4 and (out / "accuracy_vs_step.png").stat().st_size > 1000
    shown = capsys.readouterr().out
    assert "protocol:" in shown and "cached features, no augmentation" in shown


def test_cache_avoids_re_extraction_and_follows_the_checkpoint(tmp_path, data, monkeypatch):
    ckpt = export(tmp_path)
    args = ["knn", str(ckpt), "--train", str(data[0]), "--val", str(data[1]), "--k", "3",
            "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2

    def boom(*a, **k):
        raise AssertionError("extracted again")

    monkeypatch.setattr(feat_mod, "extract", boom)
    assert main(args) == 0  # served from the cache
    export(tmp_path, seed=1)  # same path, new weights → new content hash → must extract
    with pytest.raises(AssertionError, match="extracted again"):
        main(args)


def test_bad_inputs_are_one_line_errors(tmp_path, data, capsys):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    nolabel = tmp_path / "nolabel.npz"
    np.savez(nolabel, images=np.zeros((4, 8, 8), np.uint8))
    from selfsup.shard_writer import main as shards_main

    shards_main([str(nolabel), str(tmp_path / "nl"), "--split", "train"])
    other = write_shards(tmp_path / "o", n=10, split="val", classes=2)
    ckpt = str(export(tmp_path))
    cases = [
        ([str(tmp_path / "missing.safetensors")], data, "checkpoint not found"),
        ([str(tmp_path / "plain.safetensors")], data, "no 'selfsup' metadata"),
        ([ckpt], (tmp_path / "nl" / "train.json", data[1]), "has no 'cls' label"),
        ([ckpt], (data[0], other), "different class sets"),
        ([ckpt, "--k", "500"], data, "larger than the train set"),
        ([ckpt], (tmp_path / "nowhere", data[1]), "--train:"),
    ]
    capsys.readouterr()
    for extra, (train, val), message in cases:
        rc = main(["knn", *extra, "--train", str(train), "--val", str(val), "--no-cache"])
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bar
        assert rc == 2 and err.startswith("selfsup-eval: error:") and message in err, (message, err)
