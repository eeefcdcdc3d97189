"""selfsup-eval under bad data and bad exports (issue #16, evaluation side): a truncated shard,
val classes that train lacks, and export metadata that must be refused before anything is built.
Each case failed before its fix (exit 0 with a wrong score, a traceback, or a 43 GB allocation)."""

import json

import numpy as np
import pytest
import torch

from selfsup_eval.cli import main
from test_eval_fixtures import export, images, write_split


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    return write_split(root, "train", 32, shard_size=16), write_split(root, "val", 12, shard_size=16, seed=1)


def run(capsys, *argv):
    capsys.readouterr()
    rc = main([*map(str, argv), "--no-cache"])
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    return rc, err, lines


def assert_one_line_error(rc, err, lines, *fragments):
    assert rc == 2 and "Traceback" not in err, err
    assert lines[-1].startswith("selfsup-eval: error:"), lines
    assert sum(line.startswith("selfsup-eval:") for line in lines) == 1
    for f in fragments:
        assert f in lines[-1], (f, lines[-1])


def test_a_truncated_shard_is_an_error_not_a_shorter_split(tmp_path, data, capsys):
    """A tar cut at a member boundary reads short without any tar error: 9 of 16 samples."""
    import shutil

    val = tmp_path / "val"
    shutil.copytree(data[1].parent, val, ignore=shutil.ignore_patterns("train*"))
    tar = val / "val-000000.tar"
    blob = tar.read_bytes()
    tar.write_bytes(blob[:len(blob) // 2 // 512 * 512])  # whole 512-byte tar blocks: no read error
    ckpt = export(tmp_path / "ok.safetensors")
    rc, err, lines = run(capsys, "knn", ckpt, "--train", data[0], "--val", val / "val.json", "--k", "1")
    assert_one_line_error(rc, err, lines, "val-000000.tar yields", "its index says 12", "truncated")


def write_npz_split(out, split, labels, classes=3):
    from selfsup.shard_writer import main as shards_main

    out.mkdir(parents=True, exist_ok=True)
    imgs, _ = images(len(labels), 16, classes)
    npz = out / f"{split}.npz"
    np.savez(npz, images=imgs, labels=np.asarray(labels),
             class_names=np.array([f"class{c}" for c in range(classes)]))
    assert shards_main([str(npz), str(out), "--split", split]) == 0
    return out / f"{split}.json"


def test_val_classes_that_train_lacks_are_an_error_with_their_names(tmp_path, capsys):
    """Same class_names in both indexes, but train holds classes 0 and 1 only: val's class 2
    cannot be predicted (this scored 0.00 % and exit 0)."""
    train = write_npz_split(tmp_path / "t", "train", [0, 1] * 8)
    val = write_npz_split(tmp_path / "v", "val", [2] * 6 + [0, 1])
    rc, err, lines = run(capsys, "knn", "raw-pixels", "--train", train, "--val", val, "--k", "1")
    assert_one_line_error(rc, err, lines, "6 of 8 val samples", "'class2'", "no train sample has")


def _export_with(tmp_path, **changes):
    """A valid export whose metadata then gets ``changes`` (None deletes the key)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = export(tmp_path / "m.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["selfsup"])
    meta.update(changes)
    out = tmp_path / "bad.safetensors"
    save_file(load_file(str(path)), str(out), metadata={"selfsup": json.dumps(meta)})
    return out


@pytest.mark.parametrize("changes, fragment", [
    ({"input_size": 60000}, "input_size 60000 is not an integer side in 1..2048"),
    ({"input_size": "16"}, "input_size '16'"),
    ({"model_kwargs": 5}, "model_kwargs 5 is not a JSON object"),
    ({"model_kwargs": {"in_chans": 4}}, "in_chans 4"),
    ({"mean": "0.5"}, "mean '0.5' is not a list"),
    ({"std": [0.5, 0.0, 0.5]}, "std [0.5, 0.0, 0.5] has a value that is not positive"),
    ({"model_name": 7}, "model_name 7"),
    ({"feature_dim": -1}, "feature_dim -1"),
])
def test_bad_export_metadata_is_refused_before_anything_is_built(tmp_path, data, capsys, monkeypatch,
                                                                   changes, fragment):
    import timm

    bad = _export_with(tmp_path, **changes)
    built = []
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: built.append(a) or 1 / 0)
    rc, err, lines = run(capsys, "knn", bad, "--train", data[0], "--val", data[1], "--k", "1")
    assert_one_line_error(rc, err, lines, fragment)
    assert built == []  # refused from the metadata alone


def test_a_plain_json_value_as_metadata_is_refused(tmp_path, data, capsys):
    from safetensors.torch import save_file

    path = tmp_path / "list.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"selfsup": "[1, 2]"})
    rc, err, lines = run(capsys, "knn", path, "--train", data[0], "--val", data[1], "--k", "1")
    assert_one_line_error(rc, err, lines, "not a JSON object")
