"""The Python API (selfsup.train, selfsup_eval.evaluate / embed) against the CLIs: identical
records and files, and bad input as one UsageError whose message is the CLI's error line."""

import json

import numpy as np
import pytest

import selfsup
import selfsup_eval
from conftest import ROOT, write_shards
from selfsup.cli import train_main
from selfsup_eval.cli import main as eval_main
from selfsup_io.errors import UsageError
from test_eval_fixtures import export, write_split
from tinyrun import TINY


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    train = write_split(root, "train", 36, shard_size=16)
    val = write_split(root, "val", 15, shard_size=16, seed=1)
    return root, train, val, export(root / "ckpt.safetensors", step=2)


def test_evaluate_returns_the_records_the_cli_writes(data, tmp_path, capsys):
    root, train, val, ckpt = data
    cache = str(tmp_path / "cache")
    assert eval_main(["all", str(ckpt), "--baseline", "raw-pixels", "--train", str(train), "--val", str(val),
                      "--k", "3", "5", "--out", str(tmp_path / "cli"), "--cache-dir", cache, "--no-pictures"]) == 0
    cli_records = json.loads((tmp_path / "cli" / "results.json").read_text())
    records = selfsup_eval.evaluate([ckpt], train=train, val=val, baseline=["raw-pixels"], k=[3, 5],
                                    cache_dir=cache, out=str(tmp_path / "api"), no_pictures=True)
    assert json.loads(json.dumps(records)) == cli_records
    assert (tmp_path / "api" / "results.json").read_text() == (tmp_path / "cli" / "results.json").read_text()
    assert {"knn", "linear", "knn_linear", "retrieval"} <= set(cli_records[1])
    knn_only = selfsup_eval.evaluate(str(ckpt), train=str(train), val=str(val), protocols=["knn"], k=[3],
                                     cache_dir=cache)
    assert "linear" not in knn_only[0] and knn_only[0]["knn"]["k=3"] == cli_records[1]["knn"]["k=3"]


def cli_error(capsys, rc) -> str:
    assert rc == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_input_raises_the_cli_line(data, tmp_path, capsys):
    root, train, val, ckpt = data
    capsys.readouterr()
    cases = [  # (CLI argv, API call)
        (["knn", str(ckpt), "--train", str(tmp_path / "none"), "--val", str(val)],
         lambda: selfsup_eval.evaluate(ckpt, train=tmp_path / "none", val=val, protocols=["knn"])),
        (["knn", str(ckpt), "--train", str(train), "--val", str(val), "--k", "0"],
         lambda: selfsup_eval.evaluate(ckpt, train=train, val=val, protocols=["knn"], k=[0])),
        (["knn", str(ckpt), "--train", str(train), "--val", str(val), "--k", "99"],
         lambda: selfsup_eval.evaluate(ckpt, train=train, val=val, protocols=["knn"], k=[99], no_cache=True)),
        (["embed", str(tmp_path / "x.safetensors"), "--data", str(train), "--out", str(tmp_path / "o")],
         lambda: selfsup_eval.embed(tmp_path / "x.safetensors", train)),
    ]
    for argv, call in cases:
        line = cli_error(capsys, eval_main(argv))
        with pytest.raises(UsageError) as e:
            call()
        assert str(e.value) == line and line.startswith("selfsup-eval: error: ")
    with pytest.raises(selfsup_eval.UsageError, match="protocols must be"):
        selfsup_eval.evaluate(ckpt, train=train, val=val, protocols=["linear", "knn"])
    with pytest.raises(UsageError, match="unknown option 'kk'"):
        selfsup_eval.evaluate(ckpt, train=train, val=val, kk=3)


def test_embed_returns_what_the_cli_writes(data, tmp_path):
    root, train, val, ckpt = data
    assert eval_main(["embed", str(ckpt), "--data", str(val), "--out", str(tmp_path / "cli"), "--no-cache"]) == 0
    emb, index = selfsup_eval.embed(ckpt, val, no_cache=True)
    assert isinstance(emb, np.ndarray) and emb.shape == (15, 512)
    np.testing.assert_array_equal(emb, np.load(tmp_path / "cli" / "embeddings.npy"))
    lines = (tmp_path / "cli" / "index.csv").read_text().splitlines()[1:]
    assert [f"{r['row']},{r['key']},{r['label']},{r['shard']}" for r in index] == lines
    mapped, _ = selfsup_eval.embed(ckpt, val, out=tmp_path / "api", no_cache=True)
    assert isinstance(mapped, np.memmap)  # opened with mmap_mode="r"


def test_train_returns_the_run_dir_and_bad_overrides_raise_the_cli_line(tmp_path, capsys):
    shards = write_shards(tmp_path / "shards")
    overrides = dict(o.split("=", 1) for o in TINY)
    run = selfsup.train(ROOT / "recipes" / "tiny.yaml", **{"data.train": str(shards), "run.dir": str(tmp_path / "run"),
                                                           **overrides}, train__max_steps=2)
    assert run == str(tmp_path / "run") and (tmp_path / "run" / "export" / "backbone.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2
    capsys.readouterr()
    rc = train_main([str(ROOT / "recipes" / "tiny.yaml"), "train.batch_size=0", f"data.train={shards}"])
    line = cli_error(capsys, rc)
    with pytest.raises(UsageError) as e:
        selfsup.train(str(ROOT / "recipes" / "tiny.yaml"), train__batch_size=0, data__train=str(shards))
    assert str(e.value) == line and line.startswith("selfsup-train: error: ")
