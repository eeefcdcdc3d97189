"""selfsup-eval embed: the probes' features (same cache, same protocol as an independent timm
forward), shard order, float16, unlabelled shards, torchrun's one-process order, one-line errors."""

import csv
import io
import json
import subprocess
import tarfile

import numpy as np
import pytest
import torch

from selfsup_eval.cli import main
from selfsup_eval.features import cache_key
from test_eval_fixtures import ROOT, child_env, export, torchrun, write_split


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    train = write_split(root / "data", "train", 40, shard_size=16)  # shards of 16, 16, 8
    val = write_split(root / "data", "val", 12, shard_size=16, seed=1)
    ckpt = export(root / "ckpt.safetensors", step=3)
    return root, train, val, ckpt


def shard_keys(index_json):
    """Every key in the shards, in shard order, read with tarfile (not the project's reader)."""
    keys = []
    for shard in json.loads(index_json.read_text())["shards"]:
        with tarfile.open(index_json.parent / shard["name"]) as t:
            for m in t.getmembers():
                k = m.name.split(".", 1)[0]
                if not keys or keys[-1] != k:
                    keys.append(k)
    return keys


def read_csv(path):
    return list(csv.DictReader(path.open()))


def timm_features(ckpt, index_json):
    """An independent forward: timm model + the export's weights, the documented preprocessing
    (at input_size the images are used as they are), [0, 1], mean 0.5, std 0.25 (the export's)."""
    import timm
    from PIL import Image
    from safetensors.torch import load_file

    meta = json.loads(__import__("safetensors").safe_open(str(ckpt), "pt").metadata()["selfsup"])
    model = timm.create_model(meta["model_name"], pretrained=False, **meta["model_kwargs"]).eval()
    model.load_state_dict(load_file(str(ckpt)))
    xs = []
    for shard in json.loads(index_json.read_text())["shards"]:
        with tarfile.open(index_json.parent / shard["name"]) as t:
            for m in t.getmembers():
                if m.name.endswith((".png", ".jpg")):
                    img = Image.open(io.BytesIO(t.extractfile(m).read())).convert("RGB")
                    xs.append(torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255)
    x = (torch.stack(xs) - 0.5) / 0.25
    with torch.no_grad():
        return model(x).numpy()


def test_embeddings_are_the_knn_features_and_an_independent_forward(setup, tmp_path):
    root, train, val, ckpt = setup
    cache = tmp_path / "cache"
    assert main(["knn", str(ckpt), "--train", str(train), "--val", str(val), "--k", "3",
                 "--cache-dir", str(cache)]) == 0
    out = tmp_path / "e"
    assert main(["embed", str(ckpt), "--data", str(train), "--out", str(out), "--cache-dir", str(cache)]) == 0
    emb = np.load(out / "embeddings.npy", mmap_mode="r")
    assert emb.dtype == np.float32 and emb.shape == (40, 512)
    from selfsup_eval.checkpoint import load_backbone
    from selfsup_io.shards import resolve_shards

    key = cache_key(load_backbone(str(ckpt)), resolve_shards(str(train)).urls, "cpu")
    used = torch.load(cache / f"{key}.pt", weights_only=True)  # what the k-NN ran on
    np.testing.assert_array_equal(emb, used["features"].numpy())  # bit for bit: the same cache
    info = json.loads((out / "embed.json").read_text())
    import hashlib

    assert info["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert info["from_cache"] and info["rows"] == 40 and info["dim"] == 512 and len(info["shards"]) == 3
    assert info["protocol"]["size"] == 16 and info["protocol"]["mean"] == [0.5] * 3
    rows = read_csv(out / "index.csv")
    assert [r["key"] for r in rows] == shard_keys(train) and [r["row"] for r in rows] == [str(i) for i in range(40)]
    assert [r["label"] for r in rows] == [str(i % 3) for i in range(40)]  # write_split's labels
    assert [r["shard"].rsplit("-", 1)[-1] for r in rows] == ["000000.tar"] * 16 + ["000001.tar"] * 16 + ["000002.tar"] * 8
    np.testing.assert_allclose(emb, timm_features(ckpt, train), rtol=1e-4, atol=1e-4)
    # a fresh extraction (no cache) streamed through the part files: the same numbers; float16 halves
    fresh = tmp_path / "f"
    assert main(["embed", str(ckpt), "--data", str(train), "--out", str(fresh), "--no-cache",
                 "--dtype", "float16", "--batch-size", "7"]) == 0
    half = np.load(fresh / "embeddings.npy")
    assert half.dtype == np.float16 and (fresh / "embeddings.npy").stat().st_size < 0.55 * (out / "embeddings.npy").stat().st_size
    np.testing.assert_allclose(half.astype(np.float32), emb, rtol=2 ** -10, atol=1e-4 * np.abs(emb).max())
    assert not json.loads((fresh / "embed.json").read_text())["from_cache"]
    assert sorted(p.name for p in fresh.iterdir()) == ["embed.json", "embeddings.npy", "index.csv"]  # no parts left


def test_unlabelled_shards_embed_with_empty_labels(setup, tmp_path):
    root, _, _, ckpt = setup
    data = write_split(tmp_path / "u", "train", 10, labels=False)
    out = tmp_path / "e"
    assert main(["embed", str(ckpt), "--data", str(data), "--out", str(out), "--no-cache"]) == 0
    assert [r["label"] for r in read_csv(out / "index.csv")] == [""] * 10
    assert np.load(out / "embeddings.npy").shape == (10, 512)


def test_bad_input_is_one_line(setup, tmp_path, capsys):
    root, train, _, ckpt = setup
    assert main(["embed", str(ckpt), "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("selfsup-eval: error: --data") and "Traceback" not in err[0]
    assert main(["embed", str(tmp_path / "missing.safetensors"), "--data", str(train), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == f"selfsup-eval: error: checkpoint not found: {tmp_path / 'missing.safetensors'}"


def test_torchrun_writes_the_one_process_order(setup, tmp_path):
    root, train, _, ckpt = setup
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["embed", str(ckpt), "--data", str(train), "--out", str(one), "--no-cache"]) == 0
    # 3 shards on 2 processes: two dealt whole, the third shared sample by sample
    r = subprocess.run(torchrun(2, "-m", "selfsup_eval", "embed", str(ckpt), "--data", str(train),
                                "--out", str(two), "--no-cache", "--batch-size", "5"),
                       env=child_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("embeddings:") == 1  # rank 0 speaks
    assert (one / "index.csv").read_text() == (two / "index.csv").read_text()
    np.testing.assert_allclose(np.load(two / "embeddings.npy"), np.load(one / "embeddings.npy"), rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in two.iterdir()) == ["embed.json", "embeddings.npy", "index.csv"]


def test_a_failed_extraction_leaves_nothing_in_out(setup, tmp_path, capsys):
    root, train, _, ckpt = setup
    index = json.loads(train.read_text())
    index["shards"][0]["num_samples"] += 1  # the index promises a sample the tar does not hold
    index["num_samples"] += 1
    bad = train.parent / "promised.json"
    bad.write_text(json.dumps(index))
    out = tmp_path / "o"
    assert main(["embed", str(ckpt), "--data", str(bad), "--out", str(out), "--no-cache"]) == 2
    assert "index says 17" in capsys.readouterr().err
    assert list(out.iterdir()) == []
