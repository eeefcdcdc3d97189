"""Resuming a run: which checkpoint, whether the recipe still fits it, and what a damaged one costs.

* ``resume=auto`` tries the run's checkpoints newest first. One that cannot be loaded (a file
  truncated by a full disk, a bit flip, a half-copied directory) is named in one line and the
  previous complete one is used; only when none loads is it an error. The damaged ones are then
  renamed ``.damaged-step-N`` (kept for inspection): left as ``step-N`` they would count towards
  ``checkpoint.keep``, and with ``keep: 1`` the next checkpoint written before step N (a
  preemption's) was deleted at once in their favour, leaving nothing that loads. An explicit
  ``resume=PATH`` is never swapped for another: a damaged one is an error. With accepted recipe
  changes (``--accept-changes``) ``resume=auto`` falls back past damage in the same way; only
  when no checkpoint loads does the error blame the changes (their tensors do not fit).
* An explicit ``resume=PATH`` to a step before the run's newest checkpoint starts a new history
  from there: the run directory's later checkpoints are renamed ``.abandoned-step-N``. Left in
  place, the next ``resume=auto`` (a requeue after preemption) would go back to the old history's
  newest step, and ``checkpoint.keep`` would delete the new history's checkpoints in its favour.
* Every rank loads its own files, so the ranks agree (a collective) on whether a checkpoint
  loaded before going on: a damaged ``rank-1`` file moves all ranks to the previous checkpoint.
* The recipe is compared with the one the checkpoint was written with (:mod:`selfsup.rundir`)
  before anything is loaded or ``recipe.yaml`` is replaced.
* A run that stopped between writing a checkpoint and its export (e.g. a full disk) writes that
  step's export on resume, so every checkpointed step has its export.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


from selfsup import checkpoint as ckpt
from selfsup import elastic
from selfsup import rundir
from selfsup.collective import any_rank


def _all_ok(acc, ok: bool) -> bool:
    return not any_rank(acc, not ok)


def _check_recipe(trainer, path: Path) -> list[str]:
    """The accepted recipe changes (empty: none); raises for refused ones."""
    try:
        saved = rundir.saved_recipe(path, trainer.run_dir)
    except Exception as e:  # a damaged recipe.yaml: the load below decides about the rest
        trainer.acc.print(f"resume: cannot read {path / 'recipe.yaml'} ({type(e).__name__}); "
                          "the recipe is not compared")
        return []
    if saved is None:
        return []
    accepted = rundir.check_resume_recipe(saved, trainer.cfg, path, trainer.accept_changes)
    if accepted:
        trainer.acc.print(f"resume: going on from {path} with the changed recipe "
                          f"(--accept-changes): {'; '.join(accepted)}")
    return accepted


def _misfit(accepted: list[str], whose: str) -> str:
    """What a failed load says when recipe changes were accepted: most likely they, not damage
    (e.g. objective.proj_dim changed and the head's tensors no longer fit). Under resume=auto an
    older checkpoint is still tried first: the same changes loading there means the newest was
    damaged, and falling back is then what a run without changes would do."""
    if not accepted:
        return ""
    return (f"; the accepted recipe changes ({'; '.join(accepted)}) do not fit {whose} tensors: "
            "restore them or start a new run.dir")


def resume(trainer) -> Path | None:
    """Load the checkpoint ``trainer.cfg.resume`` names into ``trainer``; the path or None."""
    cfg, acc = trainer.cfg, trainer.acc
    if cfg.resume == "auto":
        candidates = list(reversed(ckpt.list_checkpoints(trainer.run_dir)))
    else:
        path = ckpt.resolve_resume(cfg.resume, trainer.run_dir)
        candidates = [path] if path is not None else []
    if not candidates:
        return None
    accepted = _check_recipe(trainer, candidates[0])
    damaged = []
    for path in candidates:
        if damaged:
            accepted = _check_recipe(trainer, path)
        error = None
        try:
            state, rank_state = ckpt.load_checkpoint(acc, path)
        except ckpt.CheckpointError as e:
            error = e
        if _all_ok(acc, error is None):
            break
        reason = str(error) if error is not None else f"checkpoint {path} cannot be loaded on another rank"
        if cfg.resume != "auto":
            raise ckpt.CheckpointError(reason + _misfit(accepted, "its"))
        damaged.append(reason)
        acc.print(f"resume: {reason}; trying the previous checkpoint")
    else:
        raise ckpt.CheckpointError(f"none of the {len(candidates)} checkpoint(s) of {trainer.run_dir} "
                                   f"can be loaded (newest: {damaged[0]})"
                                   + (_misfit(accepted, "their") or "; resume=none starts over"))
    if damaged and acc.is_main_process:
        _set_aside(trainer, candidates[:candidates.index(path)], "damaged", "delete it once inspected")
    _restore(trainer, path, state, rank_state)
    step = trainer.state["step"]
    if cfg.resume != "auto" and acc.is_main_process:  # later steps: another history now
        later = [p for p in ckpt.list_checkpoints(trainer.run_dir)
                 if int(ckpt.STEP_DIR.match(p.name).group(1)) > step]  # PATH may be named anything
        _set_aside(trainer, later, "abandoned", f"the run goes on from step {step}")
    export = trainer.run_dir / "export" / f"backbone-step{step:09d}.safetensors"
    if acc.is_main_process and not export.is_file():  # the run stopped before writing it
        trainer.export()
    return path


def _set_aside(trainer, paths: list[Path], why: str, note: str) -> None:
    """Rename checkpoints out of the ``step-N`` names, to ``.WHY-step-N`` (the module docstring
    says when); ``resume=auto`` and ``checkpoint.keep`` no longer see them."""
    for bad in paths:
        aside = bad.with_name(f".{why}-{bad.name}")
        try:
            shutil.rmtree(aside, ignore_errors=True)  # an older copy of the same step set aside
            os.replace(bad, aside)
            trainer.acc.print(f"resume: {bad} renamed {aside.name} ({note})")
        except OSError as e:
            trainer.acc.print(f"resume: could not rename the {why} {bad} ({e.strerror or e}); "
                              "remove it, or it counts towards checkpoint.keep")


def _restore(trainer, path: Path, state: dict, rank_state: dict | None) -> None:
    trainer.state.update({k: state[k] for k in trainer.state if k in state})
    if rank_state is not None:
        trainer.generator.set_state(rank_state["generator"])
        trainer.positions = dict(rank_state["positions"])
    if elastic.layout_changed(trainer, state, rank_state):  # another layout: selfsup.elastic
        trainer.acc.print(elastic.continue_epoch(trainer, path, state))
    if getattr(trainer, "seen", None) is not None:  # data.record_keys
        trainer.seen.restore(path, trainer.state["epoch"], state.get("world_size", 1),
                             trainer.acc.is_main_process)
    trainer.acc.print(f"resumed from {path} at step {trainer.state['step']}")
