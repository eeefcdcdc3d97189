"""The selfsup-eval command: `all` on a run directory, reports, one-line errors."""

import csv
import json
import shutil

import pytest
import torch

from selfsup_eval.cli import main
from test_eval_fixtures import export, export_step, write_split


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return write_split(root, "train", 48, shard_size=16), write_split(root, "val", 18, shard_size=16, seed=1)


def test_all_on_a_run_directory_writes_step_ordered_results_and_the_plot(tmp_path, data, capsys):
    run = tmp_path / "run"
    for step in (20, 5):  # written out of order: the records must come back by step
        export_step(run, step, seed=step)
    out = tmp_path / "out"
    rc = main(["all", str(run), "--baseline", "raw-pixels", "--train", str(data[0]), "--val", str(data[1]),
               "--k", "3", "10", "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    records = json.loads((out / "results.json").read_text())
    assert [r["path"] for r in records] == ["raw-pixels", str(run / "export" / "backbone-step000000005.safetensors"),
                                            str(run / "export" / "backbone-step000000020.safetensors")]
    assert [r["step"] for r in records[1:]] == [5, 20] and records[1]["objective"] == "simclr"
    for r in records:
        assert set(r["knn"]) == set(r["knn_top5"]) == {"k=3", "k=10"}
        assert r["train_samples"] == 48 and r["val_samples"] == 18 and r["corrupt_samples"] == 0
        assert all(r["knn"][k] <= r["knn_top5"][k] for k in r["knn"])
    assert records[0]["knn"]["k=3"] == 1.0  # the class squares are separable in pixel space
    assert "linear" not in records[0]  # a --baseline gets k-NN only
    for r in records[1:]:
        lin = r["linear"]
        assert set(lin) >= {"top1", "top5", "lr", "wd"} and 0 <= lin["top1"] <= lin["top5"] <= 1
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [row["step"] for row in rows] == ["0", "5", "20"]
    assert float(rows[2]["knn_top1_k=10"]) == pytest.approx(records[2]["knn"]["k=10"])
    assert float(rows[1]["linear_top1"]) == pytest.approx(records[1]["linear"]["top1"])
    assert (out / "accuracy_vs_step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    shown = capsys.readouterr().out
    assert shown.count("protocol:") == 1 and "cached features, no augmentation" in shown
    assert "run@5" in shown and "run@20" in shown and "raw-pixels" in shown


def test_a_single_checkpoint_gets_no_plot_and_the_latest_export_is_found(tmp_path, data):
    run = tmp_path / "solo"
    export(run / "export" / "backbone.safetensors", step=7)
    out = tmp_path / "out"
    assert main(["knn", str(run), "--train", str(data[0]), "--val", str(data[1]), "--k", "1",
                 "--out", str(out), "--no-cache"]) == 0
    records = json.loads((out / "results.json").read_text())
    assert [r["step"] for r in records] == [7] and "linear" not in records[0]
    assert not (out / "accuracy_vs_step.png").exists()


def test_bad_inputs_are_one_line_errors_with_status_2(tmp_path, data, capsys):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    unlabelled = write_split(tmp_path / "nl", "train", 8, labels=False)
    two_classes = write_split(tmp_path / "two", "val", 8, classes=2)
    # no index next to the tars: class names unknown, so the label sets are compared
    loose = tmp_path / "loose"
    loose.mkdir()
    for split, classes in (("train", 2), ("val", 3)):
        src = write_split(tmp_path / f"src-{split}", split, 9, shard_size=16, classes=classes)
        shutil.copy(src.parent / f"{split}-000000.tar", loose)
    ckpt = str(export(tmp_path / "ok.safetensors"))
    empty_run = tmp_path / "empty-run"
    (empty_run / "export").mkdir(parents=True)
    cases = [
        ([str(tmp_path / "missing.safetensors")], data, "checkpoint not found"),
        ([str(tmp_path / "plain.safetensors")], data, "no 'selfsup' metadata"),
        ([str(tmp_path / "junk.safetensors")], data, "not a readable safetensors file"),
        ([str(empty_run)], data, "holds no exported checkpoint"),
        ([ckpt], (unlabelled, data[1]), "has no 'cls' label"),
        ([ckpt], (data[0], two_classes), "different class sets"),
        ([ckpt], (loose / "train-000000.tar", loose / "val-000000.tar"), "mismatched class sets"),
        ([ckpt, "--k", "500"], data, "--k 500 is larger than the train set (48 samples)"),
        ([ckpt], (tmp_path / "nowhere", data[1]), "--train:"),
    ]
    capsys.readouterr()
    for extra, (train, val), message in cases:
        rc = main(["knn", *extra, "--train", str(train), "--val", str(val), "--no-cache"])
        err = capsys.readouterr().err
        lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
        assert rc == 2 and "Traceback" not in err, (message, err)
        assert lines[-1].startswith("selfsup-eval: error:") and message in lines[-1], (message, lines)
        assert sum(line.startswith("selfsup-eval:") for line in lines) == 1


def test_default_k_sweep_stops_at_the_train_size(tmp_path, data):
    out = tmp_path / "out"
    assert main(["knn", "raw-pixels", "--train", str(data[0]), "--val", str(data[1]), "--out", str(out),
                 "--no-cache"]) == 0
    assert list(json.loads((out / "results.json").read_text())[0]["knn"]) == ["k=10", "k=20"]


def test_argument_errors_exit_2(capsys):
    assert main(["knn", "raw-pixels", "--train", "a", "--val", "b", "--k", "0"]) == 2
    assert "--k values must be at least 1" in capsys.readouterr().err
