"""Checkpoints (for resuming) and exports (for evaluation and downstream use).

Nothing half-written is ever left where a checkpoint or export is expected: a checkpoint is
written into ``checkpoints/.tmp-step-N`` and renamed to ``checkpoints/step-N`` once every process
has finished writing; an export is written to a temp file and renamed. A run killed mid-write
therefore leaves the previous checkpoint as the latest complete one, and ``resume=auto`` picks it.

A checkpoint holds accelerate's state (model, optimizer, RNG of every process), ``trainer.json``
(step and data position shared by all ranks) and ``rank-R.pt`` per process (augmentation RNG and
that rank's data-stream positions).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

STEP_DIR = re.compile(r"^step-(\d{9})$")
TRAINER_FILE = "trainer.json"
EXPORT_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint path that is not one (one-line message)."""


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:09d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temp dirs of interrupted writes ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / TRAINER_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """``auto`` → latest complete checkpoint of the run or None; ``none`` → None; else a path."""
    if resume in ("none", "", None):
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / TRAINER_FILE).is_file():
        raise CheckpointError(f"resume={resume} is not a selfsup checkpoint directory (no "
                              f"{TRAINER_FILE} inside); pass a checkpoints/step-N directory, "
                              "resume=auto or resume=none")
    return path


def save_checkpoint(accelerator, run_dir: str | Path, step: int, trainer_state: dict,
                    rank_state: dict, keep: int) -> Path:
    """Collective: every process calls it. Returns the final checkpoint directory."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        for stale in final.parent.glob(".old-step-*"):  # left by a kill inside _discard
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    torch.save(rank_state, tmp / f"rank-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(tmp / TRAINER_FILE, "w") as f:
            json.dump(trainer_state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # re-saving the same step (e.g. preempted right after a save)
            _discard(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            _discard(old)
    accelerator.wait_for_everyone()
    return final


def _discard(path: Path) -> None:
    """Delete a checkpoint: renamed out of the ``step-N`` names first (atomic), so that a kill in
    the middle of the delete never leaves a half-deleted ``step-N`` that still has its
    ``trainer.json`` and would pass for complete."""
    trash = path.with_name(f".old-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def load_checkpoint(accelerator, path: Path) -> tuple[dict, dict | None]:
    """Restore accelerate's state; return (trainer state, this rank's state or None)."""
    accelerator.load_state(str(path))
    trainer_state = json.loads((path / TRAINER_FILE).read_text())
    rank_file = path / f"rank-{accelerator.process_index}.pt"
    same_world = trainer_state.get("world_size") == accelerator.num_processes
    rank_state = torch.load(rank_file, weights_only=False) if same_world and rank_file.is_file() else None
    return trainer_state, rank_state


def export_backbone(backbone: torch.nn.Module, run_dir: str | Path, metadata: dict) -> Path:
    """Write ``export/backbone-stepN.safetensors`` and refresh ``export/backbone.safetensors``.

    Weights only, loadable with timm + safetensors (docs/formats.md); ``metadata`` goes, as JSON,
    under the safetensors metadata key ``selfsup``.
    """
    out = Path(run_dir) / "export"
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in backbone.state_dict().items()}
    meta = {"selfsup": json.dumps({"format": EXPORT_FORMAT, **metadata})}
    path = out / f"backbone-step{metadata['step']:09d}.safetensors"
    for target in (path, out / "backbone.safetensors"):
        tmp = target.with_name(f".tmp-{target.name}")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, target)
    return path
