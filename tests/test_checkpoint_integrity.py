"""Issue 30 (C): weights that load but are not good. A checkpoint damaged in place fails its
checksums and resume=auto falls back past it; NaN/inf or integer weights are refused in one line
by the trainer's loader, the evaluator and the exporter; selfsup-export never overwrites its
source; checkpoint files follow the umask; a resume logs every step once."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import ROOT
from selfsup.integrity import CHECKSUM_FILE, write_checksums
from selfsup_eval.cli import main as eval_main
from selfsup_eval.export_cli import main as export_main
from test_eval_foreign import model
from test_reliability import last_error, train

COMMON = ["train.max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep=3"]


def step_dir(run, step):
    return run / "checkpoints" / f"step-{step:09d}"


def flip_a_weight_byte(path):
    """Change one byte inside the tensor data (past the header): the file still parses."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little") if path.suffix == ".safetensors" else 0
    data[header + (len(data) - header) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def rewrite_model(ckpt, change):
    """Rewrite ckpt/model.safetensors with ``change(tensors)`` applied and the checksums renewed:
    a checkpoint written like that, not damaged after writing."""
    path = ckpt / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata=meta)
    (ckpt / CHECKSUM_FILE).unlink()
    write_checksums(ckpt)


def first_float(tensors):
    return next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run with checkpoints at steps 2 and 4 (copied by each test that changes it)."""
    from conftest import write_shards

    base = tmp_path_factory.mktemp("integrity")
    shards = write_shards(base / "shards")
    old = os.umask(0o022)
    try:
        assert train(base / "run", shards, *COMMON) == 0
    finally:
        os.umask(old)
    return base / "run", shards


def copy_run(trained, tmp_path):
    import shutil

    run, shards = trained
    shutil.copytree(run, tmp_path / "run", symlinks=True)
    return tmp_path / "run", shards


def test_every_checkpoint_file_has_a_checksum_and_follows_the_umask(trained):
    run, _ = trained
    ckpt = step_dir(run, 4)
    sums = json.loads((ckpt / CHECKSUM_FILE).read_text())["sha256"]
    files = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE)
    assert sorted(sums) == files and "model.safetensors" in sums and "rank-0.safetensors" in sums
    # model.safetensors and rank-R.safetensors were 0600 while the rest followed the umask
    modes = {f: (ckpt / f).stat().st_mode & 0o777 for f in files}
    assert set(modes.values()) == {0o644}, modes


def test_a_byte_changed_in_place_is_damage_and_resume_auto_falls_back(trained, tmp_path, capsys):
    run, shards = copy_run(trained, tmp_path)
    latest = step_dir(run, 4)
    flip_a_weight_byte(latest / "model.safetensors")  # loads fine without a checksum
    load_file(str(latest / "model.safetensors"))
    capsys.readouterr()
    assert train(run, shards, *COMMON) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {latest} cannot be loaded (damaged: model.safetensors does not match" in out
    assert f"resumed from {step_dir(run, 2)} at step 2" in out
    # resume=PATH never falls back
    flip_a_weight_byte(step_dir(run, 4) / "optimizer.bin")
    assert train(run, shards, *COMMON, f"resume={step_dir(run, 4)}") == 2
    assert "optimizer.bin does not match the checksum" in last_error(capsys)


def test_metrics_jsonl_keeps_each_step_once_after_a_resume(trained, tmp_path):
    run, shards = copy_run(trained, tmp_path)
    import shutil
    shutil.rmtree(step_dir(run, 4))  # as if stopped after step 4 with only step 2 saved
    assert train(run, shards, *COMMON) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("how,message", [
    ("nan", "NaN/inf value(s)"), ("int", "not a floating type")])
def test_the_trainers_loader_refuses_non_finite_or_integer_weights(trained, tmp_path, capsys, how, message):
    run, shards = copy_run(trained, tmp_path)

    def change(t):
        k = first_float(t)
        t[k] = t[k].clone().fill_(float("nan")) if how == "nan" else t[k].round().to(torch.int32)
    rewrite_model(step_dir(run, 4), change)
    assert train(run, shards, *COMMON, "train.max_steps=6", "--accept-changes",
                 f"resume={step_dir(run, 4)}") == 2
    err = last_error(capsys)
    assert err.startswith(f"selfsup-train: error: checkpoint {step_dir(run, 4)} cannot be loaded")
    assert message in err


def test_the_divergence_message_never_calls_a_damaged_checkpoint_good(trained, tmp_path):
    from selfsup.trainer import Trainer

    run, _ = copy_run(trained, tmp_path)
    flip_a_weight_byte(step_dir(run, 4) / "model.safetensors")

    class Stub:
        run_dir = run
    message = Trainer._diverged(Stub(), "the loss of step 5 is nan")
    assert f"checkpoint that passes its checksums is {step_dir(run, 2)}," in message
    assert "last good" not in message


def nan_export(src, dst, how="nan"):
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(src))
    k = first_float(tensors)
    tensors[k] = tensors[k].clone().fill_(float("inf")) if how == "nan" else tensors[k].round().to(torch.int64)
    save_file(tensors, str(dst), metadata=meta)
    return k


@pytest.mark.parametrize("how,message", [("nan", "NaN/inf"), ("int", "not a floating type")])
def test_the_evaluator_refuses_such_an_export(trained, tmp_path, capsys, how, message):
    run, shards = trained
    bad = tmp_path / "bad.safetensors"
    key = nan_export(run / "export" / "backbone.safetensors", bad, how)
    capsys.readouterr()
    rc = eval_main(["knn", str(bad), "--train", str(shards), "--val", str(shards),
                    "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("selfsup-eval: error:"), err
    assert key in err[0] and message in err[0]


def test_the_exporter_refuses_them_from_a_checkpoint_and_a_foreign_file(trained, tmp_path, capsys):
    run, _ = copy_run(trained, tmp_path)
    rewrite_model(step_dir(run, 4), lambda t: t.__setitem__(first_float(t), t[first_float(t)] * float("nan")))
    out = tmp_path / "o.safetensors"
    assert export_main([str(step_dir(run, 4)), str(out)]) == 2
    assert "NaN/inf" in last_error(capsys) and not out.exists()
    state = model("resnet10t", 0).state_dict()
    state["conv1.0.weight"] = state["conv1.0.weight"].to(torch.int8)
    torch.save(state, tmp_path / "foreign.pth")
    assert export_main([str(tmp_path / "foreign.pth"), str(out), "--model", "resnet10t"]) == 2
    err = last_error(capsys)
    assert "conv1.0.weight has dtype int8" in err and not out.exists()


def test_export_refuses_to_write_over_its_source(trained, tmp_path, capsys):
    run, _ = copy_run(trained, tmp_path)
    src = tmp_path / "foreign.pth"
    torch.save(model("resnet10t", 0).state_dict(), src)
    before = src.read_bytes()
    (tmp_path / "link.pth").symlink_to(src)
    for out in (src, tmp_path / "link.pth"):
        assert export_main([str(src), str(out), "--model", "resnet10t"]) == 2
        assert "which this command reads" in last_error(capsys)
    assert src.read_bytes() == before
    weights = step_dir(run, 4) / "model.safetensors"
    before = weights.read_bytes()
    assert export_main([str(run), str(weights)]) == 2  # RUN's latest checkpoint's own file
    assert "which this command reads" in last_error(capsys) and weights.read_bytes() == before
    assert export_main([str(run), str(tmp_path / "fine.safetensors")]) == 0
