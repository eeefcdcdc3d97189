"""Resuming with another layout: a different number of processes or of loader workers.

* **The global batch is kept.** A run's global batch (``train.batch_size`` x processes x
  ``train.grad_accum``) is part of what it computes (the lr follows it, and the loss of a
  contrastive method depends on the batch it gathers). On a resume with another number of
  processes, :func:`batch_layout` therefore changes the per-process batch so that the
  checkpoint's global batch is kept, with the recipe's accumulation: a micro-batch's loss then
  still sees the same number of samples (accumulation would split the contrastive batch). To keep
  memory per process instead, raise ``train.grad_accum`` (with ``--accept-changes``): the batch is
  then recomputed for that accumulation. Only where the accumulation does not divide does it
  change too (the one closest to the recipe's). Where no split exists (a global batch of 256 over
  3 processes) the resume is refused with one line naming the process counts that work, unless
  ``--accept-changes``: then the run goes on with the recipe's per-process batch, the new global
  batch, and the learning rate that ``optim.lr_scaling`` gives it, and says so.
* **The epoch goes on where it stopped.** The checkpoint stores what was left of the epoch when
  its current layout began and how far each (process, worker) role got
  (:mod:`selfsup.partition`); :func:`continue_epoch` reads every old rank's file and splits the
  remainder over the new layout. No sample of the epoch is used twice or skipped.
* **Auditable.** ``data.record_keys: true`` writes the keys each process consumed, in order, to
  ``RUN_DIR/seen/epoch-E/rank-R.txt`` (:class:`SeenKeys`); a resume cuts them back to the
  checkpoint, so the files hold exactly what the run, as resumed, used.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from selfsup import checkpoint as ckpt
from selfsup import partition as pt
from selfsup.config import RecipeError


def _saved_layout(path: Path) -> tuple[int, int, int] | None:
    """(processes, per-process batch, accumulation) the checkpoint was written with."""
    try:
        state = json.loads((path / ckpt.TRAINER_FILE).read_text())
        if "batch_size" in state:
            return state["world_size"], state["batch_size"], state["grad_accum"]
        from omegaconf import OmegaConf

        recipe = OmegaConf.load(path / "recipe.yaml")
        return state["world_size"], int(recipe.train.batch_size), int(recipe.train.grad_accum)
    except Exception:  # no or a damaged checkpoint: resume itself says what is wrong with it
        return None


def batch_layout(cfg, world: int, run_dir: Path, accept: bool) -> tuple[int, int, str | None]:
    """(per-process batch, accumulation, a line to log or None) for a run on ``world`` processes
    that resumes from the checkpoint ``cfg.resume`` names (see the module docstring)."""
    batch, accum = cfg.train.batch_size, cfg.train.grad_accum
    try:
        path = ckpt.resolve_resume(cfg.resume, run_dir)
    except ckpt.CheckpointError:
        path = None
    saved = _saved_layout(path) if path is not None else None
    if saved is None or saved[0] == world:
        return batch, accum, None
    old_world, old_batch, old_accum = saved
    G = old_world * old_batch * old_accum
    if old_batch != batch:  # the recipe changes the batch itself: rundir judges that
        return batch, accum, None
    if G % (world * accum) == 0:  # the recipe's accumulation (maybe changed, to save memory)
        per = G // (world * accum)
        return per, accum, (f"resume: {world} processes instead of {old_world}: train.batch_size "
                            f"{per}, train.grad_accum {accum} keep the global batch of {G}")
    if G % world == 0:
        per = G // world
        a = min((a for a in range(1, per + 1) if per % a == 0), key=lambda a: abs(a - accum))
        return per // a, a, (f"resume: {world} processes instead of {old_world}: train.batch_size "
                             f"{per // a}, train.grad_accum {a} keep the global batch of {G}")
    works = [n for n in range(1, min(G, 4096) + 1) if G % n == 0]
    if not accept:
        raise RecipeError(f"cannot keep the global batch of {G} ({old_world} processes x "
                          f"{old_batch} x {old_accum}) on {world} processes; process counts that "
                          f"keep it: {', '.join(map(str, works[:24]))}; or pass --accept-changes "
                          f"to go on with the global batch {world * batch * accum} (lr scaled by "
                          f"optim.lr_scaling)")
    return batch, accum, (f"resume: global batch {G} -> {world * batch * accum} on {world} processes "
                          "(--accept-changes); the lr follows optim.lr_scaling")


def layout_changed(trainer, state: dict, rank_state: dict | None) -> bool:
    """Whether the checkpoint's epoch position cannot be used as it is: another number of
    processes, of workers, or another batch, or (exact epochs) no epoch plan in the checkpoint."""
    loader = getattr(trainer, "loader", None)
    if rank_state is None or rank_state.get("num_workers") != trainer.cfg.data.num_workers:
        return True
    if loader is None or not loader.exact or state.get("batch_in_epoch", 0) == 0:
        return False
    seg = state.get("segment")
    return seg is None or [seg["world"], seg["workers"], seg["batch"], seg["end"]] != [
        loader.world_size, max(1, loader.num_workers), loader.batch_size, loader.batches_per_epoch]


def continue_epoch(trainer, path: Path, state: dict) -> str:
    """Set ``trainer.state``'s segment and position to go on with the checkpoint's epoch in the
    trainer's layout; returns the line to log."""
    old = state.get("segment")
    loader = getattr(trainer, "loader", None)
    if old is None or loader is None or not loader.exact:
        trainer.state.update(batch_in_epoch=0, segment=None)
        return (f"resume: {path} holds no epoch plan for this data (written before exact epochs, "
                "or shards without counts); the data position restarts at the current epoch")
    seg = pt.Segment.from_json(old)
    drawn = {}
    for rank in range(seg.world):
        rank_state = ckpt.load_rank_state(path, rank) or {}
        drawn.update({rank * seg.workers + role: n for role, n in rank_state.get("positions", {}).items()})
    steps = loader.batches_per_epoch // trainer.accum
    new = pt.resegment(seg, drawn, loader.world_size, max(1, loader.num_workers), loader.batch_size,
                       steps, trainer.accum, loader.samples_per_epoch)
    trainer.state.update(segment=new.to_json(), batch_in_epoch=new.start)
    trainer.positions = {}
    return (f"resume: epoch {state['epoch']} goes on with {pt.size(new.remaining)} of its samples "
            f"left, on {new.world} process(es) x {new.workers} worker(s) (it was "
            f"{seg.world} x {seg.workers}); none used twice or skipped")


class SeenKeys:
    """``RUN_DIR/seen/epoch-E/rank-R.txt``: the keys this process consumed, one a line."""

    def __init__(self, run_dir: Path, rank: int):
        self.root, self.rank = Path(run_dir) / "seen", rank
        self.file, self.epoch = None, None

    def _path(self, epoch: int, rank: int | None = None) -> Path:
        return self.root / f"epoch-{epoch}" / f"rank-{self.rank if rank is None else rank}.txt"

    def record(self, epoch: int, keys) -> None:
        if epoch != self.epoch:
            self.close()
            self._path(epoch).parent.mkdir(parents=True, exist_ok=True)
            self.file, self.epoch = open(self._path(epoch), "a"), epoch
        self.file.write("".join(f"{k}\n" for k in keys))

    def mark(self, epoch: int) -> dict:
        """Where this process's record of ``epoch`` stands (stored in its checkpoint file)."""
        if self.file is not None:
            self.file.flush()
        path = self._path(epoch)
        return {"epoch": epoch, "bytes": path.stat().st_size if path.is_file() else 0}

    def restore(self, path: Path, epoch: int, world: int, is_main: bool) -> None:
        """Cut the records back to the checkpoint ``path`` (written by ``world`` processes):
        what the run did after it is not part of the run any more. The main process does it
        for every rank, before any rank writes again (resume has collectives after it)."""
        if not is_main or not self.root.is_dir():
            return
        for later in self.root.glob("epoch-*"):
            if later.name.split("-")[-1].isdigit() and int(later.name.split("-")[-1]) > epoch:
                shutil.rmtree(later, ignore_errors=True)
        for rank in range(world):
            mark = ((ckpt.load_rank_state(path, rank) or {}).get("seen") or {})
            target = self._path(epoch, rank)
            if target.is_file() and mark.get("epoch") == epoch:
                with open(target, "r+") as f:
                    f.truncate(mark["bytes"])

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
