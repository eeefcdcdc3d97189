"""Progress in a batch job: no carriage returns, a bounded number of plain lines, an early
estimate of the whole run; a bar on a terminal."""

from __future__ import annotations

import io
import re

import pytest

from conftest import ROOT
from selfsup.cli import train_main
from selfsup_io import progress
from selfsup_io.progress import Progress

TINY = str(ROOT / "recipes" / "tiny.yaml")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress.time, "monotonic", c)
    monkeypatch.delenv("SELFSUP_PROGRESS", raising=False)
    monkeypatch.delenv("SELFSUP_PROGRESS_SECONDS", raising=False)
    monkeypatch.delenv("SELFSUP_ESTIMATE_SECONDS", raising=False)
    return c


def test_lines_every_minute_an_estimate_and_a_last_line(clock):
    out = Stream(tty=False)
    p = Progress(1000, "simclr runs/x", unit="steps", stream=out, rate_unit="img/s", rate_scale=256)
    clock.now += 30  # start-up: workers, compilation
    for _ in range(1000):  # 1000 steps over 500 s: 2 steps/s after the first
        p.update()
        p.set(loss="1.2345")
        clock.now += 0.5
    p.close()
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text
    # 530 s in all, a line at most every 60 s: 8 periodic lines, one estimate, one final line
    periodic = [line for line in lines if "ETA" in line]
    assert len(periodic) == 8 and len(lines) == 10, lines
    estimate = next(line for line in lines if "estimate" in line)
    # measured after the start-up: 2 steps/s = 512 img/s; at 60 s 939 steps are left → 0:07:50
    assert "512.0 img/s" in estimate and "0:07:50" in estimate and "start-up took 0:00:30" in estimate
    assert re.search(r"^simclr runs/x: 61/1000 steps \(6\.1%\) \| 512\.0 img/s \| loss 1\.2345 \| "
                     r"elapsed 0:01:00 \| ETA 0:07:50$", periodic[0]), periodic[0]
    assert lines[-1].endswith("| done") and lines[-1].startswith("simclr runs/x: 1000/1000 steps")


def test_a_terminal_gets_a_bar_and_off_prints_nothing(clock, monkeypatch):
    tty = Stream(tty=True)
    p = Progress(10, "shards train", unit="img", stream=tty)
    assert p.mode == "bar"
    for _ in range(10):
        p.update()
    p.close()
    assert "\r" in tty.getvalue() and "10/10" in tty.getvalue()
    monkeypatch.setenv("SELFSUP_PROGRESS", "off")
    quiet = Stream(tty=True)
    p = Progress(10, "x", stream=quiet)
    p.update(10)
    p.write("hello")
    p.close()
    assert quiet.getvalue() == ""
    monkeypatch.setenv("SELFSUP_PROGRESS", "sometimes")
    with pytest.raises(ValueError, match="SELFSUP_PROGRESS='sometimes'"):
        Progress(10, "x", stream=quiet)


def test_a_training_run_without_a_terminal_writes_plain_bounded_lines(tmp_path, shards, capfd,
                                                                     monkeypatch):
    monkeypatch.setenv("SELFSUP_PROGRESS_SECONDS", "1")
    monkeypatch.setenv("SELFSUP_ESTIMATE_SECONDS", "0.5")
    assert "\r" not in capfd.readouterr().err  # the fixture's selfsup-shards: lines too
    import time

    t0 = time.monotonic()
    assert train_main([TINY, f"data.train={shards}", f"run.dir={tmp_path / 'run'}",
                       "train.max_steps=12", "train.log_every=4"]) == 0
    elapsed = time.monotonic() - t0
    err = capfd.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("simclr ")]
    assert lines and lines[-1].startswith(f"simclr {tmp_path / 'run'}: 12/12 steps (100.0%)")
    assert lines[-1].endswith("| done") and "loss " in lines[-1]
    assert len(lines) <= elapsed / 1 + 3, lines  # one a second at most, the estimate, the last
