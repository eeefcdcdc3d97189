"""The progress line's last word tells how the work ended (issue 30): ``done`` only when it got
to its end, ``stopped`` when an error follows (it printed "done" right before the failure)."""

from __future__ import annotations

import io
import shutil
import tarfile

import numpy as np
from PIL import Image

from conftest import ROOT


def test_close_says_done_or_stopped_once(monkeypatch):
    from selfsup_io.progress import Progress

    monkeypatch.setenv("SELFSUP_PROGRESS", "lines")
    for done, word in ((True, "| done"), (False, "| stopped")):
        out = io.StringIO()
        bar = Progress(4, "work", unit="img", stream=out)
        bar.update(2)
        bar.close(done=done)
        bar.close(done=not done)  # a second close (the `finally` after a success) does nothing
        lines = out.getvalue().splitlines()
        assert len(lines) == 1 and lines[0].startswith("work: 2/4 img (50.0%)") and lines[0].endswith(word)


def _lines(err: str, prefix: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(prefix)]


def test_an_extraction_that_fails_its_checks_is_not_done(tmp_path, capsys, monkeypatch):
    """A val shard cut at a member boundary: read without a tar error, then refused as shorter
    than its index; its progress line must not say "done" right before that error."""
    from selfsup_eval.cli import main
    from test_eval_fixtures import write_split

    monkeypatch.setenv("SELFSUP_PROGRESS", "lines")
    train = write_split(tmp_path / "t", "train", 16)
    val = write_split(tmp_path / "v", "val", 12, seed=1)
    tar = val.parent / "val-000000.tar"
    blob = tar.read_bytes()
    tar.write_bytes(blob[:len(blob) // 2 // 512 * 512])
    assert main(["knn", "raw-pixels", "--train", str(train), "--val", str(val), "--k", "1", "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert _lines(err, "raw-pixels train:")[-1].endswith("| done")
    assert _lines(err, "raw-pixels val:")[-1].endswith("| stopped")
    assert err.strip().splitlines()[-1].startswith("selfsup-eval: error:")


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_a_training_run_that_fails_is_not_done(tmp_path, capsys, monkeypatch):
    """data.max_corrupt_fraction=0 and an unreadable sample: the run stops with one error line
    after its first logged step; the progress line before it says "stopped"."""
    from selfsup.cli import train_main

    monkeypatch.setenv("SELFSUP_PROGRESS", "lines")
    with tarfile.open(tmp_path / "s-000000.tar", "w") as tf:
        for i in range(64):
            data = b"\xff\xd8 not a jpeg" if i == 40 else _png(i)
            info = tarfile.TarInfo(f"k{i:03d}.{'jpg' if i == 40 else 'png'}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    run = tmp_path / "run"
    rc = train_main([str(ROOT / "recipes" / "tiny.yaml"), f"data.train={tmp_path / 's-000000.tar'}",
                     "data.samples_per_epoch=64", "data.max_corrupt_fraction=0", "data.shuffle_buffer=1",
                     f"run.dir={run}"])
    err = capsys.readouterr().err
    assert rc == 2 and "data.max_corrupt_fraction=0" in err.strip().splitlines()[-1], err
    progress = _lines(err, f"simclr {run}:")
    assert progress and progress[-1].endswith("| stopped") and not any(p.endswith("| done") for p in progress)
    shutil.rmtree(run)
