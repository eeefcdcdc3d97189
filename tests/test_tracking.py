"""Trackers (log.trackers) receive what metrics.jsonl records: W&B in offline mode, MLflow on a
local file store and TensorBoard, each read back from its own files; a resume continues the same
W&B / MLflow run; a tracker that is unknown, missing or cannot start is one line, exit 2."""

from __future__ import annotations

import json
import struct

import pytest

from conftest import ROOT, write_shards
from selfsup.cli import train_main

TINY = str(ROOT / "recipes" / "tiny.yaml")
KEYS = ("loss", "lr", "epoch", "img_per_s", "corrupt_samples")


@pytest.fixture
def tracker_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return tmp_path / "mlruns"


def jsonl(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def wandb_history(run) -> dict:
    """{(file, step): {key: value}} from W&B's offline run files: LevelDB-log framed protobuf
    records (7-byte file header, 32 KiB blocks, 7-byte record headers) read without W&B's API."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = {}
    for path in sorted(run.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, buf = path.read_bytes(), 7, b""
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if left < 7 or (kind == 0 and length == 0):
                pos += left
                continue
            buf += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # FULL or LAST: one whole record
                record = pb.Record()
                record.ParseFromString(buf)
                buf = b""
                if record.HasField("history"):
                    items = {".".join(i.nested_key) or i.key: json.loads(i.value_json)
                             for i in record.history.item}
                    out[path.parent.name, record.history.step.num] = items
    return out


def mlflow_metrics(root) -> dict:
    """{run_id: {key: [(step, value)]}} from MLflow's file store."""
    runs = {}
    for metrics in root.glob("*/*/metrics"):
        runs[metrics.parent.name] = {  # a metric named a/b is the file metrics/a/b
            f.relative_to(metrics).as_posix(): [(int(step), float(value)) for _, value, step in
                                                (line.split() for line in f.read_text().splitlines())]
            for f in metrics.rglob("*") if f.is_file()}
    return runs


def test_trackers_receive_the_jsonl_metrics_and_a_resume_continues_their_runs(tmp_path, tracker_env):
    shards = write_shards(tmp_path / "s", n=32)
    run = tmp_path / "run"
    common = [TINY, f"data.train={shards}", f"run.dir={run}", "train.log_every=1",
              "log.trackers=[wandb,mlflow,tensorboard]", "log.project=selfsup-test"]
    assert train_main(common + ["train.max_steps=2"]) == 0
    assert train_main(["--accept-changes", *common, "train.max_steps=4", "resume=auto"]) == 0
    records = jsonl(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]

    ids = json.loads((run / "trackers.json").read_text())
    # MLflow: one run (the resume continued it), every JSONL value at its step
    runs = mlflow_metrics(tracker_env)
    assert list(runs) == [ids["mlflow"]]
    for key in KEYS:
        assert runs[ids["mlflow"]][key] == [(r["step"], pytest.approx(r[key], rel=1e-6))
                                            for r in records], key
    params = next(tracker_env.glob(f"*/{ids['mlflow']}/params"))
    assert (params / "train.batch_size").read_text() == "16"  # the resolved recipe, flattened
    assert (params / "log.trackers").read_text() == '["wandb", "mlflow", "tensorboard"]'

    # W&B: two offline segments of the same run id, together the JSONL's history
    history = wandb_history(run)
    assert {name.rsplit("-", 1)[1] for name, _ in history} == {ids["wandb"]}
    assert sorted(step for _, step in history) == [1, 2, 3, 4]
    by_step = {step: items for (_, step), items in history.items()}
    for r in records:
        for key in KEYS:
            assert by_step[r["step"]][key] == pytest.approx(r[key], rel=1e-6), (r["step"], key)

    # TensorBoard: the same scalars (float32)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in (run / "tensorboard").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for key in acc.Tags()["scalars"]:
            values.setdefault(key, {}).update({e.step: e.value for e in acc.Scalars(key)})
    for key in KEYS:
        assert values[key] == {r["step"]: pytest.approx(r[key], rel=1e-6) for r in records}, key


@pytest.mark.parametrize("trackers, expected", [
    ("[wandbb]", "unknown tracker 'wandbb'; known: aim"),
    ("[comet_ml]", "tracker 'comet_ml' is not installed (pip install comet_ml)"),
])
def test_unknown_or_missing_tracker_is_one_line_before_anything_is_built(
        tmp_path, shards, capsys, trackers, expected):
    rc = train_main([TINY, f"data.train={shards}", f"run.dir={tmp_path / 'run'}",
                     f"log.trackers={trackers}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "run").exists()  # refused before the run directory was touched


def test_a_tracker_that_cannot_start_is_one_line(tmp_path, shards, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://tracking")  # MLflow cannot start
    rc = train_main([TINY, f"data.train={shards}", f"run.dir={tmp_path / 'run'}",
                     "log.trackers=[mlflow]", "train.max_steps=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("selfsup-train: error: log.trackers: mlflow did not start:")
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "run" / "export").exists()  # stopped before the first step
    # and released run.dir's lock on the way out: the same process trains there at once
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert train_main([TINY, f"data.train={shards}", f"run.dir={tmp_path / 'run'}",
                       "train.max_steps=1"]) == 0, capsys.readouterr().err


def test_selfsup_eval_logs_its_table_to_the_trackers(tmp_path, tracker_env, capsys):
    from selfsup_eval.cli import main as eval_main

    shards = write_shards(tmp_path / "s", n=32)
    val = write_shards(tmp_path / "s", n=16, split="val", seed=1)
    run = tmp_path / "run"
    assert train_main([TINY, f"data.train={shards}", f"run.dir={run}", "train.max_steps=2"]) == 0
    out = tmp_path / "eval"
    assert eval_main(["all", str(run / "export" / "backbone.safetensors"), "--train", str(shards),
                      "--val", str(val), "--k", "3", "5", "--no-cache", "--out", str(out),
                      "--baseline", "raw-pixels", "--trackers", "mlflow"]) == 0
    records = {r["name"]: r for r in json.loads((out / "results.json").read_text())}
    (runs,) = mlflow_metrics(tracker_env).values()
    trained = next(r for r in records.values() if not r["baseline"])
    assert runs["knn/k5"] == [(2, pytest.approx(trained["knn"]["k=5"], rel=1e-6))]
    assert runs["knn_top5/k3"] == [(2, pytest.approx(trained["knn_top5"]["k=3"], rel=1e-6))]
    assert runs["linear/top1"] == [(2, pytest.approx(trained["linear"]["top1"], rel=1e-6))]
    raw = records["raw-pixels"]
    assert runs["baseline/raw-pixels/knn/k3"] == [(0, pytest.approx(raw["knn"]["k=3"], rel=1e-6))]
    assert "\r" not in capsys.readouterr().err  # selfsup-eval's progress without a terminal
    assert eval_main(["knn", str(run / "export" / "backbone.safetensors"), "--train", str(shards),
                      "--val", str(val), "--trackers", "wandbb", "--out", str(out)]) == 2
    assert "--trackers: unknown tracker 'wandbb'" in capsys.readouterr().err


def test_an_undefined_metric_is_null_in_strict_json_and_left_out_of_the_trackers(tmp_path, monkeypatch):
    """MoCo's mochi_hard_same_class is NaN while the queue's labels are all unknown: the line must
    stay JSON that strict readers accept."""
    from selfsup.logs import MetricsLog

    sent = []
    log = MetricsLog(tmp_path, trackers=())
    monkeypatch.setattr(log.trackers, "log", lambda values, step: sent.append(values))
    log.log(3, {"loss": 1.23456789, "share": float("nan"), "inf": float("inf"), "n": 2})
    log.close()

    def strict(token):
        raise ValueError(f"not JSON: {token}")

    record = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=strict)
    assert record["loss"] == 1.234568 and record["share"] is None and record["inf"] is None
    assert sent == [{"loss": 1.234568, "n": 2}]
