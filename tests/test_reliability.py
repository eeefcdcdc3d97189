"""Issue 16, training side: a run never hangs, never silently mixes or corrupts, never runs code
from a file. Each test reproduces one failure of the adversarial pass (they failed before)."""

import errno
import io
import json
import os
import signal
import stat
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import ROOT, child_env, write_shards
from selfsup.cli import train_main
from selfsup.data import DataError, ShardLoader
from selfsup.views import ViewSpec

TINY = str(ROOT / "recipes" / "tiny.yaml")


def train(run_dir, shards, *overrides):
    return train_main([TINY, f"data.train={shards}", f"run.dir={run_dir}", *overrides])


def last_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "nothing on stderr"
    return err[-1]


def weights(run_dir):
    return load_file(str(run_dir / "export" / "backbone.safetensors"))


def png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_tar_with_index(folder, members: dict, name="train-000000.tar", count=None):
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / name, "w") as tf:
        for member, data in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    samples = count if count is not None else len({m.split(".")[0] for m in members})
    index = {"format": "selfsup-shards/1", "num_samples": samples,
             "shards": [{"name": name, "num_samples": samples}]}
    (folder / "train.json").write_text(json.dumps(index))
    return folder / "train.json"


# ------------------------------------------------------------------------- the run dir lock --
def test_a_second_trainer_refuses_the_run_dir_and_a_killed_owner_leaves_no_lock(tmp_path, shards, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from selfsup.rundir import RunDirLock; "
         "RunDirLock(sys.argv[1]); print('locked', flush=True); time.sleep(300)", str(run)],
        stdout=subprocess.PIPE, env=child_env(), text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert train(run, shards, "train.max_steps=1") == 2
        err = last_error(capsys)
        assert "is in use by another trainer" in err and f"pid {holder.pid}" in err
        assert not (run / "metrics.jsonl").exists() and not (run / "recipe.yaml").exists()
    finally:
        holder.kill()  # SIGKILL: nothing runs in the owner, the kernel drops its flock
        holder.wait()
    assert train(run, shards, "train.max_steps=1") == 0  # the stale .lock file does not block
    assert train(run, shards, "train.max_steps=1") == 0  # nor does our own, released at the end


def test_a_killed_owners_forked_workers_do_not_keep_its_lock(tmp_path):
    """flock belongs to the open file description, which fork shares: an owner killed with
    SIGKILL left its lock held by the DataLoader workers it had forked until they noticed."""
    from selfsup.rundir import RunDirError, RunDirLock

    run, pid_file = tmp_path / "run", tmp_path / "worker.pid"
    owner = subprocess.run(
        [sys.executable, "-c", "import os, signal, sys, time; from selfsup.rundir import RunDirLock; "
         "RunDirLock(sys.argv[1]); pid = os.fork()\n"
         "if pid == 0:\n"  # the worker says it runs (its fork hooks have run), then lingers
         "    open(sys.argv[2] + '.tmp', 'w').write(str(os.getpid())); os.rename(sys.argv[2] + '.tmp', sys.argv[2])\n"
         "    time.sleep(60); os._exit(0)\n"
         "while not os.path.exists(sys.argv[2]): time.sleep(0.01)\n"
         "os.kill(os.getpid(), signal.SIGKILL)",
         str(run), str(pid_file)], env=child_env())
    worker = int(pid_file.read_text())
    try:
        assert owner.returncode == -9 and os.path.exists(f"/proc/{worker}")  # the worker lives on
        RunDirLock(run).release()  # raised "in use by another trainer" before
    except RunDirError as e:
        pytest.fail(str(e))
    finally:
        os.kill(worker, 9)


def test_a_run_dir_that_cannot_hold_the_lock_is_one_line_not_a_traceback(tmp_path):
    """An OSError in rank 0's lock (run.dir unwritable, or under a file) used to escape as a
    traceback, and with several processes left the other ranks waiting in the flag's reduce."""
    from selfsup.rundir import RunDirError, acquire

    class OneProcess:
        is_main_process, num_processes = True, 1
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RunDirError, match="cannot create the lock .*check run.dir"):
        acquire(OneProcess(), blocker / "run")


# ------------------------------------------------------------------------------ disk full --
def test_a_full_disk_is_one_line_and_the_missing_export_is_written_on_resume(tmp_path, shards, capsys,
                                                                            monkeypatch):
    import selfsup.checkpoint as ckpt

    run = tmp_path / "run"
    common = ["train.max_steps=3", "checkpoint.every_steps=2"]
    real_save = torch.save

    def full_disk(obj, f, *a, **k):  # what torch's zip writer says when a write comes back short
        if "optimizer" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 5184 vs 5072")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    assert train(run, shards, *common) == 2
    err = last_error(capsys)
    assert "no space left on the device" in err and "no checkpoint was written before" in err
    assert not list((run / "checkpoints").iterdir())  # the half-written temp is gone
    monkeypatch.setattr(torch, "save", real_save)
    real_file = ckpt.write_export

    def export_fails(tensors, meta, path, *a, **k):
        if "export" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_file(tensors, meta, path, *a, **k)

    monkeypatch.setattr(ckpt, "write_export", export_fails)
    assert train(run, shards, *common) == 2
    assert "its export is written when the run resumes" in last_error(capsys)
    assert (run / "checkpoints" / "step-000000002").is_dir()
    assert not list((run / "export").glob("*.safetensors"))
    monkeypatch.setattr(ckpt, "write_export", real_file)
    assert train(run, shards, *common) == 0
    exports = sorted(p.name for p in (run / "export").glob("backbone-step*.safetensors"))
    assert exports == ["backbone-step000000002.safetensors", "backbone-step000000003.safetensors"]


def test_exports_follow_the_umask(tmp_path, shards):
    old = os.umask(0o022)
    try:
        assert train(tmp_path / "run", shards, "train.max_steps=1") == 0
    finally:
        os.umask(old)
    for path in (tmp_path / "run" / "export").glob("*.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


# ------------------------------------------------------------------------------ data --------
def test_a_truncated_tar_is_counted_and_reported(tmp_path, capsys):
    index = write_shards(tmp_path / "s", n=32, shard_size=16)
    tar = tmp_path / "s" / "train-000001.tar"
    with tarfile.open(tar) as tf:
        members = tf.getmembers()
    cut = next(m.offset for m in members if m.name.startswith("train-00000028"))
    tar.write_bytes(tar.read_bytes()[:cut])  # at a member boundary: tarfile reads it without error
    loader = ShardLoader(str(index), batch_size=4, num_workers=0, views=[ViewSpec(16, random=False)],
                         shuffle_buffer=1, samples_per_epoch=28)
    batches = list(loader.epoch(0))
    assert sum(b["corrupt"] for b in batches) == 4
    events = sum((b["events"] for b in batches), [])
    assert events == [f"{tar} ended after 12 of the 16 samples its index lists (truncated tar?); "
                      "4 counted as corrupt"]
    capsys.readouterr()
    # the trainer's exact epoch (2 steps of 16 over the index's 32) counts each missing sample it
    # asks for: all 4, and it fills the last batch with 4 samples used again
    assert train(tmp_path / "run", index, "train.max_steps=2", "data.max_corrupt_fraction=0.5") == 0
    err = capsys.readouterr().err
    assert "selfsup-train: warning: " + events[0] in err and "used again to fill them" in err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["corrupt_samples"] == 4


def test_more_corrupt_samples_than_the_threshold_stop_the_run(tmp_path, capsys):
    images = np.random.default_rng(0).integers(0, 255, (64, 16, 16, 3), dtype=np.uint8)
    members = {}
    for i in range(64):
        members[f"k{i:03d}.png"] = png(images[i]) if i % 3 else b"\x89PNG damaged"
        members[f"k{i:03d}.cls"] = b"0"
    index = write_tar_with_index(tmp_path / "s", members)
    assert train(tmp_path / "a", index, "train.max_steps=8", "data.max_corrupt_fraction=0.2") == 2
    err = last_error(capsys)
    assert "could not be read or decoded" in err and "data.max_corrupt_fraction=0.2" in err
    assert train(tmp_path / "b", index, "train.max_steps=4", "data.max_corrupt_fraction=0.5") == 0
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert 0 < records[-1]["corrupt_samples"] < 64


def test_one_shard_where_nothing_decodes_among_good_ones(tmp_path):
    """With 2 workers the worker that got the bad shard has nothing to give: an error, not a
    hang at step 1; with one reader both shards mix and the bad half is counted."""
    images = np.random.default_rng(0).integers(0, 255, (16, 16, 16, 3), dtype=np.uint8)
    good = {f"g{i:03d}.png": png(images[i]) for i in range(16)}
    bad = {f"b{i:03d}.png": b"\x89PNG damaged" for i in range(16)}
    write_tar_with_index(tmp_path / "s", good, "train-000000.tar")
    write_tar_with_index(tmp_path / "s", bad, "train-000001.tar")
    spec = f"{tmp_path / 's'}/train-{{000000..000001}}.tar"
    loader = ShardLoader(spec, batch_size=4, num_workers=2, views=[ViewSpec(16)], samples_per_epoch=32)
    with pytest.raises(DataError, match="could be decoded"):
        list(loader.epoch(0))
    loader = ShardLoader(spec, batch_size=4, num_workers=0, views=[ViewSpec(16)], samples_per_epoch=32,
                         shuffle_buffer=32)
    batches = list(loader.epoch(0))
    assert len(batches) == 8 and sum(b["corrupt"] for b in batches) >= 16


def test_an_unknown_key_is_one_line_naming_it(tmp_path, shards, capsys):
    assert train(tmp_path / "run", shards, "data.decode_size=0") == 2
    assert "unknown recipe key 'data.decode_size'" in last_error(capsys)


def test_the_monitor_on_unlabelled_shards_fails_at_start(tmp_path, capsys):
    from selfsup.shard_writer import main as shards_main

    images = np.random.default_rng(0).integers(0, 255, (32, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "u.npz", images=images)
    assert shards_main([str(tmp_path / "u.npz"), str(tmp_path / "u"), "--split", "train"]) == 0
    val = write_shards(tmp_path / "v", n=16, split="val")
    run = tmp_path / "run"
    assert train(run, tmp_path / "u", "train.max_steps=2", "monitor.every_steps=2",
                 f"data.val={val}") == 2
    err = last_error(capsys)
    assert err.startswith("selfsup-train: error: monitor.train: ") and "no labels" in err
    assert not (run / "metrics.jsonl").exists()


def test_a_stop_signal_ends_a_run_stuck_waiting_for_data(tmp_path):
    """A pipe: shard that never delivers: the trainer waits outside any step. SIGTERM must still
    end it (exit 75, no checkpoint claimed) instead of being swallowed until SIGKILL."""
    flag = tmp_path / "reading"
    spec = f"pipe:touch {flag} && exec sleep 120"
    cmd = [sys.executable, "-m", "selfsup.cli", TINY, f"data.train={spec}", "data.samples_per_epoch=64",
           "data.num_workers=1", f"run.dir={tmp_path / 'run'}"]
    env = {**child_env(), "SELFSUP_STOP_WAIT": "1"}
    log = tmp_path / "stderr.log"  # a file, not a pipe: the pipe's sleep would hold a pipe open
    with open(log, "w") as stderr:
        proc = subprocess.Popen(cmd, env=env, stderr=stderr, text=True, start_new_session=True)
    try:
        for _ in range(1200):  # the worker has started reading the shard
            if flag.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert flag.exists(), log.read_text()[-2000:]
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the sleep the pipe started, and anything left
        except ProcessLookupError:
            pass
    err = log.read_text()
    assert proc.returncode == 75, err[-2000:]
    assert "stopped by signal 15 while waiting for data at step 0" in err


def test_recipe_changes_ignore_keys_a_newer_selfsup_added_and_see_whole_model_kwargs():
    from selfsup.rundir import RunDirError, check_resume_recipe, recipe_changes

    saved = {"model": {"name": "vit", "kwargs": {}}, "optim": {"lr": 1e-3}, "train": {"log_every": 1}}
    now = {"model": {"name": "vit", "kwargs": {}}, "optim": {"lr": 1e-3}, "train": {"log_every": 5},
           "data": {"max_corrupt_fraction": 0.1}}  # a key this checkpoint's selfsup did not have
    assert recipe_changes(saved, now) == []
    grown = {**now, "model": {"name": "vit", "kwargs": {"img_size": 64}}}
    assert recipe_changes(saved, grown) == ["model.kwargs: {} -> {'img_size': 64}"]
    with pytest.raises(RunDirError, match="changed what its tensors are"):
        check_resume_recipe(saved, grown, ROOT / "ckpt", accept=True)
