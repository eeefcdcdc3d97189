"""Issue 16, resuming: a run resumes only what it can continue exactly, a damaged or crafted
checkpoint is one line (never a traceback, never unpickled code), and what resume sets aside
stays out of checkpoint.keep's way. Split from test_reliability.py (same helpers)."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from test_reliability import last_error, train, weights


# --------------------------------------------------------------- resume with a changed recipe --
def test_resume_refuses_a_changed_recipe_unless_accepted_and_never_a_changed_model(tmp_path, shards, capsys):
    run = tmp_path / "run"
    assert train(run, shards, "train.max_steps=2", "checkpoint.every_steps=1", "checkpoint.keep=5") == 0
    recipe = (run / "recipe.yaml").read_text()
    assert train(run, shards, "train.max_steps=4", "train.batch_size=8", "run.seed=3",
                 "optim.lr=1e-4", "train.log_every=2") == 2
    err = last_error(capsys)
    assert "with a changed recipe" in err and "--accept-changes" in err
    for change in ("train.batch_size: 16 -> 8", "run.seed: 0 -> 3", "optim.lr: 0.001 -> 0.0001",
                   "train.max_steps: 2 -> 4"):
        assert change in err
    assert "log_every" not in err  # changes nothing computed: never refused
    assert (run / "recipe.yaml").read_text() == recipe  # not overwritten by the refused run
    # what the checkpoint's tensors are cannot change, even on purpose
    assert train(run, shards, "train.max_steps=4", "optim.name=sgd", "--accept-changes") == 2
    err = last_error(capsys)
    assert "cannot resume" in err and "optim.name: adamw -> sgd" in err
    # accepted, but the head's tensors no longer fit: one line, not a state-dict traceback
    assert train(run, shards, "train.max_steps=2", "objective.proj_dim=16", "--accept-changes") == 2
    err = last_error(capsys)
    assert "none of the 2 checkpoint(s)" in err and "objective.proj_dim: 32 -> 16" in err
    assert "do not fit their tensors" in err
    # a lower lr (what the divergence message suggests) and a longer run, on purpose
    assert train(run, shards, "train.max_steps=4", "optim.lr=1e-4", "--accept-changes") == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    base = 1e-4 * 16 / 256  # linear scaling of the new lr, cosine over the new 4 steps
    assert records[2]["lr"] == pytest.approx(base * 0.5 * (1 + np.cos(np.pi * 2 / 4)), rel=1e-6)
    assert "lr: 0.0001" in (run / "recipe.yaml").read_text()  # now the recipe of the run


def test_divergence_message_names_the_switch_resume_needs():
    from selfsup.trainer import Trainer

    class Stub:
        run_dir = ROOT / "nonexistent-run"
    message = Trainer._diverged(Stub(), "the loss of step 4 is nan")
    assert "lower optim.lr" in message and "--accept-changes" in message


# ----------------------------------------------------------------------- no pickle, no code --
class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_rank_files_hold_no_pickle_and_a_crafted_one_does_not_run(tmp_path, shards, capsys):
    run = tmp_path / "run"
    assert train(run, shards, "train.max_steps=1") == 0
    ckpt = run / "checkpoints" / "step-000000001"
    rank = load_file(str(ckpt / "rank-0.safetensors"))
    assert set(rank) == {"generator"} and not list(ckpt.glob("rank-*.pt"))
    # a pickle put in the rank file's place is never opened: the checkpoint lacks its rank file
    marker = tmp_path / "pwned"
    torch.save({"generator": RunsACommand(marker)}, ckpt / "rank-0.pt")
    (ckpt / "rank-0.safetensors").unlink()
    assert train(run, shards, "train.max_steps=1", f"resume={ckpt}") == 2
    assert not marker.exists()
    assert "rank-0.safetensors is missing" in last_error(capsys)


# ---------------------------------------------------------------- damaged latest checkpoint --
def test_resume_auto_names_a_damaged_checkpoint_and_goes_on_from_the_previous(tmp_path, shards, capsys):
    common = ["train.max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep=3"]
    full, run = tmp_path / "full", tmp_path / "run"
    assert train(full, shards, *common) == 0
    assert train(run, shards, *common) == 0
    latest = run / "checkpoints" / "step-000000004"
    model = latest / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # cut short
    capsys.readouterr()
    assert train(run, shards, *common, "train.max_steps=4") == 0
    out = capsys.readouterr().out
    assert f"checkpoint {latest} cannot be loaded" in out and "trying the previous checkpoint" in out
    assert f"resumed from {run / 'checkpoints' / 'step-000000002'} at step 2" in out
    a, b = weights(full), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)  # steps 3-4 redone exactly
    # an explicit resume=PATH is never swapped for another checkpoint
    (latest / "rank-0.safetensors").unlink()  # a checkpoint with a file missing is not complete
    assert train(run, shards, *common, f"resume={latest}") == 2
    err = last_error(capsys)
    assert err.startswith(f"selfsup-train: error: checkpoint {latest} cannot be loaded")
    assert "rank-0.safetensors is missing" in err


@pytest.mark.parametrize("accepted", [[], ["optim.lr: 0.001 -> 0.0001"]])
def test_resume_auto_sets_a_damaged_checkpoint_aside_so_keep_does_not_delete_the_next(tmp_path, monkeypatch,
                                                                                      accepted):
    """Left as step-4 after the fall-back to step-2, a damaged checkpoint counted towards
    checkpoint.keep: with keep 1, a preemption's checkpoint at step 3 was deleted as soon as it
    was written, and the requeued run found only the damaged step-4. With accepted recipe
    changes the failed load was blamed on them and the run stopped, though step-2 loads."""
    from types import SimpleNamespace

    import selfsup.checkpoint as ckpt
    import selfsup.resume as resume_mod
    from selfsup.resume import resume

    monkeypatch.setattr(resume_mod, "_check_recipe", lambda trainer, path: list(accepted))

    run = tmp_path / "run"
    for step in (2, 4):
        ckpt.checkpoint_dir(run, step).mkdir(parents=True)
        (ckpt.checkpoint_dir(run, step) / ckpt.TRAINER_FILE).write_text(json.dumps({"step": step}))
    (run / "export").mkdir()
    (run / "export" / "backbone-step000000002.safetensors").write_bytes(b"")

    def load(acc, path):
        if path.name.endswith("4"):
            raise ckpt.CheckpointError(f"checkpoint {path} cannot be loaded (truncated)")
        return {"step": 2}, {"generator": torch.zeros(1), "positions": {}, "num_workers": 0}
    monkeypatch.setattr(ckpt, "load_checkpoint", load)
    acc = SimpleNamespace(num_processes=1, is_main_process=True, print=lambda *a: None)
    trainer = SimpleNamespace(cfg=SimpleNamespace(resume="auto", data=SimpleNamespace(num_workers=0)),
                              acc=acc, run_dir=run, accept_changes=False, state={"step": 0},
                              generator=SimpleNamespace(set_state=lambda t: None), positions={})
    assert resume(trainer) == ckpt.checkpoint_dir(run, 2) and trainer.state["step"] == 2
    assert ckpt.list_checkpoints(run) == [ckpt.checkpoint_dir(run, 2)]
    assert (run / "checkpoints" / ".damaged-step-000000004" / ckpt.TRAINER_FILE).is_file()


def test_an_explicit_older_resume_sets_the_later_checkpoints_aside(tmp_path, shards, capsys):
    """resume=step-2 in a run that reached step 4 starts a new history: left as step-4, the old
    history's newest checkpoint was what the next resume=auto (a requeue) went back to."""
    import selfsup.checkpoint as ckpt

    run = tmp_path / "run"
    assert train(run, shards, "train.max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep=3") == 0
    step2, step4 = ckpt.checkpoint_dir(run, 2), ckpt.checkpoint_dir(run, 4)
    best = tmp_path / "best"  # a PATH may be named anything: "later" is by step, not by name
    shutil.copytree(step2, best)
    capsys.readouterr()
    assert train(run, shards, "train.max_steps=3", "checkpoint.every_steps=2", "checkpoint.keep=3",
                 f"resume={best}", "--accept-changes") == 0
    assert f"{step4} renamed .abandoned-step-000000004 (the run goes on from step 2)" in capsys.readouterr().out
    assert ckpt.list_checkpoints(run) == [step2, ckpt.checkpoint_dir(run, 3)]
    assert ckpt.resolve_resume("auto", run) == ckpt.checkpoint_dir(run, 3)
    assert (run / "checkpoints" / ".abandoned-step-000000004" / ckpt.TRAINER_FILE).is_file()
