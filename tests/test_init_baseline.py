"""selfsup-eval --baseline init: the run's starting weights, read as the run read them, evaluated
next to its checkpoints; its k-NN equals evaluating the starting file directly."""

import json

import torch

from conftest import write_shards
from selfsup_eval.cli import main as eval_main
from test_eval_foreign import model, prefixed
from test_eval_suite import suite  # noqa: F401  (the fixture)
from tinyrun import train


def knn(out):
    return {r["name"]: r["knn"]["k=3"] for r in json.loads((out / "results.json").read_text())}


def test_baseline_init_is_the_starting_file(tmp_path, capsys):
    shards = write_shards(tmp_path / "s", n=32, shard_size=32)
    val = write_shards(tmp_path / "s", n=16, split="val", shard_size=16, seed=1)
    start = tmp_path / "moco.pth"  # an official-MoCo layout: the key and prefix must be the run's
    torch.save({"state_dict": {**prefixed(model("test_resnet", 0).state_dict(), "module.encoder_q."),
                               **prefixed(model("test_resnet", 9).state_dict(), "module.encoder_k.")}}, start)
    run = tmp_path / "run"
    assert train("tiny.yaml", shards, run, f"model.init={start}", "train.max_steps=2",
                 "augment.mean=[0.3,0.3,0.3]", "augment.std=[0.2,0.2,0.2]") == 0
    common = ["--train", str(shards), "--val", str(val), "--k", "3", "--no-cache"]
    assert eval_main(["knn", str(run), "--baseline", "init", *common, "--out", str(tmp_path / "a")]) == 0
    got = knn(tmp_path / "a")
    assert list(got)[0] == "init:moco.pth" and len(got) == 2
    assert eval_main(["knn", str(start), "--model", "test_resnet", "--input-size", "16", "--prefix",
                      "module.encoder_q.", "--mean", "0.3", "0.3", "0.3", "--std", "0.2", "0.2", "0.2",
                      *common, "--out", str(tmp_path / "b")]) == 0
    direct = knn(tmp_path / "b")
    assert got["init:moco.pth"] == list(direct.values())[0]
    # the file changed, then gone: one line each
    torch.save({"state_dict": prefixed(model("test_resnet", 1).state_dict(), "module.encoder_q.")}, start)
    for message in ("changed since the run started", "no longer there"):
        capsys.readouterr()
        assert eval_main(["knn", str(run), "--baseline", "init", *common]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("selfsup-eval: error: --baseline init") and message in err[0], err
        start.unlink(missing_ok=True)


def test_baseline_init_of_a_run_from_random_weights_is_one_line(tmp_path, capsys):
    shards = write_shards(tmp_path / "s", n=32, shard_size=32)
    val = write_shards(tmp_path / "s", n=16, split="val", shard_size=16, seed=1)
    assert train("tiny.yaml", shards, tmp_path / "run", "train.max_steps=1") == 0
    capsys.readouterr()
    assert eval_main(["knn", str(tmp_path / "run"), "--baseline", "init", "--train", str(shards),
                      "--val", str(val), "--k", "3", "--no-cache"]) == 2
    assert "records a starting file" in capsys.readouterr().err


def test_the_suite_takes_baseline_init_as_its_default_reference(tmp_path, suite):
    """`selfsup-eval suite RUN --baseline init`: the start is listed first, so the paired verdict
    compares each checkpoint with where its run started (here the same weights: exactly 0)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from selfsup_io.export_format import file_digest
    from test_eval_suite import run_suite

    _, path, start = suite
    with safe_open(str(start), "pt") as f:
        meta = json.loads(f.metadata()["selfsup"])
    meta["init"] = {"source": str(start), "sha256": file_digest(start), "checkpoint_key": None, "prefix": ""}
    run = tmp_path / "run" / "export" / "backbone.safetensors"
    run.parent.mkdir(parents=True)
    save_file(load_file(str(start)), str(run), metadata={"selfsup": json.dumps(meta)})
    _, records = run_suite(tmp_path, path, run, extra=["--baseline", "init", "--protocols", "knn"])
    assert records[0]["name"] == "init:backbone.safetensors" and records[0]["baseline"]
    verdict = records[1]["verdict"]
    assert verdict["reference"] == "init:backbone.safetensors" and verdict["difference"] == 0.0
