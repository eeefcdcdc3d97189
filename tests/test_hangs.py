"""Hangs and things left running (issue 30, B): a stalled ``pipe:`` shard, a FIFO among the
images, two shard writers on one folder. Every wait here is bounded by a timeout, so a
regression fails instead of hanging the suite."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from conftest import ROOT, child_env


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), colour).save(buf, "PNG")
    return buf.getvalue()


def _folder(root):
    for c, colour in (("c0", (200, 10, 10)), ("c1", (10, 200, 10))):
        (root / c).mkdir(parents=True)
        for i in range(3):
            (root / c / f"{i}.png").write_bytes(_png(colour))
    return root


def _no_leftovers(out) -> None:
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")]


# ------------------------------------------------------------------ 6. regular files only ----
def test_a_fifo_among_the_images_is_skipped_and_named_not_waited_on(tmp_path):
    src = _folder(tmp_path / "src")
    os.mkfifo(src / "c0" / "x.jpg")  # nobody ever writes to it: open() for reading would block
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "selfsup.shard_writer", str(src), str(out), "--split", "train"],
                          env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 unreadable file(s)" in proc.stderr and "x.jpg (ValueError: not a regular file (a FIFO))" in proc.stderr
    index = json.loads((out / "train.json").read_text())
    assert index["num_samples"] == 6
    _no_leftovers(out)


def test_read_regular_refuses_what_is_not_a_file_and_reads_through_links(tmp_path):
    from selfsup.folder_walk import read_regular

    (tmp_path / "a.jpg").write_bytes(b"abc")
    os.symlink(tmp_path / "a.jpg", tmp_path / "link.jpg")
    assert read_regular(str(tmp_path / "link.jpg")) == b"abc"
    os.mkfifo(tmp_path / "f.jpg")
    with pytest.raises(ValueError, match=r"not a regular file \(a FIFO\)"):
        read_regular(str(tmp_path / "f.jpg"))
    with pytest.raises(ValueError, match="not a regular file"):
        read_regular("/dev/null")


def test_a_writer_stopped_by_sigterm_leaves_no_temporary_shard(tmp_path):
    """SIGTERM (scheduler, `kill`) mid-shard: the .tar.tmp is removed as on Ctrl-C, exit 143."""
    src = _folder(tmp_path / "src")
    out, flag = tmp_path / "out", tmp_path / "stalled"
    script = ("import sys, time, pathlib; import selfsup.folder_walk as fw; import selfsup.shard_writer as sw\n"
              "real, n = fw.read_regular, [0]\n"
              "def slow(p):\n"
              "    n[0] += 1\n"
              "    if n[0] == 3: pathlib.Path(sys.argv[3]).touch(); time.sleep(120)\n"
              "    return real(p)\n"
              "sw.read_regular = slow\n"
              "sys.exit(sw.main([sys.argv[1], sys.argv[2], '--split', 'train']))\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(src), str(out), str(flag)], env=child_env(),
                            stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            if flag.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert flag.exists() and list(out.glob("*.tar.tmp")), "the writer did not reach its first shard"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
    finally:
        proc.kill()
    _no_leftovers(out)
    assert not (out / "train.json").exists()


# ---------------------------------------------------------------- 7. one writer per split ----
def test_a_second_writer_of_the_same_folder_and_split_is_refused(tmp_path, capsys):
    from selfsup.rundir import RunDirLock
    from selfsup.shard_writer import main

    src, out = _folder(tmp_path / "src"), tmp_path / "out"
    assert main([str(src), str(out), "--split", "train"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    held = RunDirLock(out, ".train.lock", remove=True)  # as a running selfsup-shards holds it
    try:
        with pytest.raises(SystemExit) as e:
            main([str(src), str(out), "--split", "train", "--shard-size", "2"])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"selfsup-shards: error: split train of {out} is in use by another "
                                  f"selfsup-shards (host ") and f"pid {os.getpid()}" in err[-1]
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".train.lock"} == before
        assert main([str(src), str(out), "--split", "val"]) == 0  # another split: not blocked
    finally:
        held.release()
    assert main([str(src), str(out), "--split", "train", "--shard-size", "2"]) == 0
    assert json.loads((out / "train.json").read_text())["num_samples"] == 6
    _no_leftovers(out)  # the lock file goes with its last holder


def test_a_lock_file_removed_by_its_holder_is_not_taken_by_a_waiter(tmp_path):
    """remove=True: the holder unlinks the file, then unlocks; a waiter that had opened the old
    file must lock the new one, or two writers would each hold 'the' lock."""
    import fcntl

    from selfsup.rundir import RunDirLock

    first = RunDirLock(tmp_path, ".s.lock", remove=True)
    stale = os.open(tmp_path / ".s.lock", os.O_RDWR)  # a waiter's descriptor of the same file
    first.release()
    fcntl.flock(stale, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the waiter locks the removed file...
    second = RunDirLock(tmp_path, ".s.lock", remove=True)  # ...which does not block a real lock
    assert os.fstat(second.fd).st_ino != os.fstat(stale).st_ino
    os.close(stale)
    second.release()
    assert not (tmp_path / ".s.lock").exists()


# ------------------------------------------------------- 5. a stalled pipe: shard command ----
def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def _close_within(stream, seconds: float) -> None:
    """``stream.close()``, failing (not hanging) when it takes longer (webdataset's took 7,200 s)."""
    import threading

    closer = threading.Thread(target=stream.close, daemon=True)
    closer.start()
    closer.join(seconds)
    assert not closer.is_alive(), f"closing the stream took more than {seconds} s"


def _group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` is still running (zombies have ended)."""
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                with open(f"/proc/{stat}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def _pids(folder) -> list[int]:
    return [int(p.read_text()) for p in sorted(folder.glob("*.pid")) if p.read_text().strip()]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_stop_signal_ends_a_stalled_pipe_and_leaves_nothing_running(tmp_path, workers):
    """`pipe:` that never delivers, with a child in the background: SIGTERM → exit 75 within
    seconds (workers=0 waited up to 7,200 s for the command), and the command, its background
    child included, is gone (workers=1 left them running as orphans)."""
    spec = (f"pipe:echo $$ > {tmp_path}/sh.pid; sleep 300 & echo $! > {tmp_path}/bg.pid; "
            f"touch {tmp_path}/reading; exec sleep 301")
    cmd = [sys.executable, "-m", "selfsup.cli", str(ROOT / "recipes" / "tiny.yaml"), f"data.train={spec}",
           "data.samples_per_epoch=64", f"data.num_workers={workers}", f"run.dir={tmp_path / 'run'}"]
    log = tmp_path / "stderr.log"  # a file: the pipe's sleeps would hold a pipe open
    with open(log, "w") as stderr:
        proc = subprocess.Popen(cmd, env={**child_env(), "SELFSUP_STOP_WAIT": "1"}, stderr=stderr,
                                stdout=subprocess.DEVNULL)
    try:
        for _ in range(1200):
            if (tmp_path / "reading").exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert (tmp_path / "reading").exists(), log.read_text()[-2000:]
        pids = _pids(tmp_path)
        assert len(pids) == 2 and all(map(_alive, pids))
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        assert rc == 75, log.read_text()[-2000:]
        for _ in range(50):  # killed at once; the kernel may take a moment to reap
            if not any(map(_alive, pids)):
                break
            time.sleep(0.1)
        assert not [p for p in pids if _alive(p)], "the pipe's processes outlived the trainer"
    finally:
        proc.kill()
        for pid in _pids(tmp_path):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_pipe_read_to_its_end_keeps_its_exit_status_and_an_abandoned_one_is_killed(tmp_path):
    import tarfile as tf

    from selfsup_io.pipes import open_url, tar_samples

    with tf.open(tmp_path / "s.tar", "w") as t:
        for i in range(3):
            info = tf.TarInfo(f"k{i}.cls")
            info.size = 1
            t.addfile(info, io.BytesIO(b"1"))
    errors = []
    list(tar_samples(f"pipe:cat {tmp_path}/s.tar; exit 3", handler=lambda e: errors.append(e) or True))
    assert errors and all("exit 3" in str(e) for e in errors)  # as webdataset reports a failed command
    got = list(tar_samples(f"pipe:cat {tmp_path}/s.tar"))  # exit 0: every sample, no error
    assert [s["__key__"] for s in got] == ["k0", "k1", "k2"]
    stream = open_url(f"pipe:echo $$ > {tmp_path}/a.pid; exec sleep 300")
    for _ in range(600):  # (a loaded machine may take a while to start the shell)
        if _pids(tmp_path):
            break
        time.sleep(0.05)
    (pid,) = _pids(tmp_path)
    try:
        _close_within(stream, 30)  # abandoned while the command still runs: its group is killed
    finally:
        stream.proc.kill()
    for _ in range(100):  # killed; the kernel may take a moment to reap
        if not _alive(pid):
            break
        time.sleep(0.05)
    assert not _alive(pid)


def test_a_stalled_http_shard_is_killed_on_close(tmp_path):
    """An http server that accepts and never answers: webdataset's curl would be waited on for
    up to 7,200 s at close; here its process group is killed."""
    import socket
    import threading

    from selfsup_io.pipes import open_url

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    stream = open_url(f"http://127.0.0.1:{server.getsockname()[1]}/x-000000.tar")
    try:
        for _ in range(600):
            if accepted:
                break
            time.sleep(0.05)
        assert accepted, "curl did not connect"
        group = stream.proc.pid
        _close_within(stream, 30)
        for _ in range(100):  # killed; the kernel may take a moment to reap
            if not _group_alive(group):
                break
            time.sleep(0.05)
        assert not _group_alive(group)  # nothing left in the command's group, curl included
    finally:
        stream.proc.kill()
        server.close()
        for conn, _ in accepted:
            conn.close()
