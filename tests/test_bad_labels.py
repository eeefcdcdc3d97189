"""Issue 30 (C, D): labels that are not class indices, and splits that are mostly unreadable.

A label that does not fit int64 (``10**30``, json ``Infinity``, 100,000 nested ``[``) or is not
integral (``2.7``) is a bad label: -1 in training (pretraining does not use labels), skipped,
counted and named in evaluation. ``selfsup-eval`` stops when more than
``--max-corrupt-fraction`` of a split is unreadable and prints the sample counts in its protocol
line; the online monitor refuses a partly labelled split instead of counting misses."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from selfsup.data import ShardLoader
from selfsup.views import ViewSpec
from selfsup_eval.cli import main as eval_main
from selfsup_io import BadLabel, label_member
from test_reliability import last_error, train

BAD = {"huge": {"cls": str(10**30).encode()},
       "infinity": {"json": b'{"label": Infinity}'},
       "nested": {"json": b"[" * 100_000},
       "fraction": {"json": b'{"label": 2.7}'},
       "text_fraction": {"cls": b"2.7"},
       "nan": {"json": b'{"label": NaN}'}}


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_is_a_bad_label(name):
    with pytest.raises(BadLabel):
        label_member(BAD[name])


def test_integral_labels_still_parse():
    assert label_member({"json": b'{"label": 3.0}'}) == 3
    assert label_member({"cls": b" 7\n"}) == 7
    assert label_member({"cls": str(2**63 - 1).encode()}) == 2**63 - 1


def jpeg(seed: int, cls: int) -> bytes:
    """A 16x16 picture whose colour is its class (k-NN on raw pixels separates the classes)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 40, (16, 16, 3), dtype=np.uint8)
    arr[..., cls % 3] += 200
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def split(folder, name, n, labels=None, unlabelled=()):
    """``folder/NAME.json`` + one tar of n samples with class i % 3; ``labels`` replaces the
    label members of some samples (index -> {member: bytes}); ``unlabelled`` have none."""
    folder.mkdir(parents=True, exist_ok=True)
    tar = f"{name}-000000.tar"
    with tarfile.open(folder / tar, "w") as tf:
        for i in range(n):
            members = {"png": jpeg(i + 100 * len(name), i % 3), "cls": str(i % 3).encode()}
            if labels and i in labels:
                del members["cls"]
                members.update(labels[i])
            if i in unlabelled:
                del members["cls"]
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{name}-{i:04d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    index = {"format": "selfsup-shards/1", "split": name, "num_samples": n,
             "class_names": ["a", "b", "c"], "shards": [{"name": tar, "num_samples": n}]}
    (folder / f"{name}.json").write_text(json.dumps(index))
    return folder / f"{name}.json"


def test_training_reads_every_bad_label_as_minus_one(tmp_path):
    bad = {i: BAD[k] for i, k in enumerate(sorted(BAD))}
    spec = split(tmp_path, "train", 8, labels=bad)
    loader = ShardLoader(str(spec), batch_size=8, num_workers=0, views=[ViewSpec(16, random=False)],
                         shuffle_buffer=1)
    (batch,) = list(loader.epoch(0))
    labels = dict(zip(batch["key"], batch["label"].tolist()))
    assert [labels[f"train-{i:04d}"] for i in range(8)] == [-1] * 6 + [0, 1]
    assert batch["corrupt"] == 0  # the images are fine: pretraining keeps them


def test_a_run_with_such_labels_trains(tmp_path):
    spec = split(tmp_path / "s", "train", 32, labels={3: BAD["huge"], 5: BAD["nested"]})
    assert train(tmp_path / "run", spec, "train.max_steps=1") == 0


def evaluate(tmp_path, train_spec, val_spec, *extra):
    return eval_main(["knn", "raw-pixels", "--train", str(train_spec), "--val", str(val_spec),
                      "--k", "3", "--no-cache", "--workers", "1", *extra])


def test_evaluation_skips_counts_and_names_bad_labels(tmp_path, capsys):
    tr = split(tmp_path, "train", 30)
    va = split(tmp_path, "val", 30, labels={4: BAD["huge"], 7: BAD["infinity"], 9: BAD["fraction"]})
    assert evaluate(tmp_path, tr, va, "--max-corrupt-fraction", "0.2") == 0
    out = capsys.readouterr().out
    assert "skipped 3 corrupt sample(s), e.g. val-0004, val-0007, val-0009" in out
    assert "samples: train 30, val 27" in out  # the protocol line says what was scored


def test_evaluation_stops_when_too_much_of_a_split_is_unreadable(tmp_path, capsys):
    tr = split(tmp_path, "train", 30)
    va = split(tmp_path, "val", 30, labels={i: BAD["nested"] for i in range(0, 30, 3)})
    assert evaluate(tmp_path, tr, va) == 2  # default: 1 %
    err = last_error(capsys)
    assert err.startswith("selfsup-eval: error: 10 of the 30 samples of the val split could not be used")
    assert "val-0000" in err and "--max-corrupt-fraction=0.01" in err
    assert evaluate(tmp_path, tr, va, "--max-corrupt-fraction", "0.5") == 0


def test_the_monitor_refuses_a_partly_labelled_split(tmp_path, capsys):
    tr = split(tmp_path / "t", "train", 32)
    va = split(tmp_path / "v", "val", 16, unlabelled={5, 6}, labels={9: BAD["fraction"]})
    run = tmp_path / "run"
    assert train(run, tr, "train.max_steps=2", "monitor.every_steps=2", f"data.val={va}") == 2
    err = last_error(capsys)
    assert err.startswith("selfsup-train: error: monitor.val: 3 of the 16 samples")
    assert "val-0005" in err and "every sample labelled" in err
    assert not (run / "metrics.jsonl").exists()  # found at start, on every rank, not at step 2
