"""Checkpoints (for resuming) and exports (for evaluation and downstream use).

Nothing half-written is ever left where a checkpoint or export is expected: a checkpoint is
written into ``checkpoints/.tmp-step-N`` and renamed to ``checkpoints/step-N`` once every process
has finished writing; an export is written to a temp file and renamed. A run killed mid-write
therefore leaves the previous checkpoint as the latest complete one, and ``resume=auto`` picks it.

A checkpoint holds accelerate's state (model, optimizer, RNG of every process), ``trainer.json``
(step and data position shared by all ranks), ``recipe.yaml`` (the recipe it was written with, so
that a resume can tell what changed: :mod:`selfsup.rundir`) and ``rank-R.safetensors`` per process
(augmentation RNG as a tensor, that rank's data-stream positions as JSON metadata). No pickle:
loading a checkpoint must not run code from a file someone handed over, so the rank files are
safetensors, and accelerate's own files are read with ``torch.load(weights_only=True)``.

A write that fails for lack of space is one line (:class:`StorageError`) saying so, instead of
torch's "unexpected pos"; the half-written temp directory is removed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from selfsup.errors import CheckpointError, StorageError  # noqa: F401  (also imported from here)
from selfsup.integrity import damage, write_checksums
from selfsup_io import export_format as fmt
from selfsup_io.export_format import STEP_DIR, TRAINER_FILE, write_export
from selfsup_io.weights import weight_problem


def storage_error(e: BaseException, path: Path, then: str) -> StorageError | None:
    """A one-line :class:`StorageError` if ``e`` is a full disk or quota (OSError ENOSPC/EDQUOT,
    or torch's zip writer, which only says "unexpected pos" when a write comes back short);
    None for any other failure, which is raised as it is."""
    text = str(e)
    full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or \
        "unexpected pos" in text or "No space left" in text or "quota" in text.lower()
    if not full:
        return None
    folder = next((p for p in [Path(path), *Path(path).parents] if p.exists()), Path("."))
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    return StorageError(f"cannot write {path}: no space left on the device or over quota ({free}); "
                        f"free space (or lower checkpoint.keep) and run the same command again: {then}")


def umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
                    rank_state: dict, keep: int, recipe: str | None = None) -> Path:
    """Collective: every process calls it. Returns the final checkpoint directory. ``recipe``
    (YAML text) is stored as the checkpoint's ``recipe.yaml``."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    previous = list_checkpoints(run_dir)
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            for stale in final.parent.glob(".old-step-*"):  # left by a kill inside _discard
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        save_rank_state(rank_state, tmp / f"rank-{accelerator.process_index}.safetensors")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if recipe is not None:
                _write_synced(tmp / "recipe.yaml", recipe)
            _write_synced(tmp / TRAINER_FILE, json.dumps(trainer_state, indent=1))
            mode = 0o666 & ~umask()  # safetensors writes 0600: every file follows the umask
            for f in tmp.rglob("*"):
                if f.is_file():
                    os.chmod(f, mode)
            write_checksums(tmp)  # verified on load (selfsup.integrity)
    except Exception as e:
        err = storage_error(e, tmp, f"it resumes from {previous[-1]}" if previous else
                            "no checkpoint was written before this one")
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # never leave the half-written temp behind
        if err is None:
            raise
        raise err from None
    if accelerator.is_main_process:
        if final.exists():  # re-saving the same step (e.g. preempted right after a save)
            _discard(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            _discard(old)
    accelerator.wait_for_everyone()
    return final


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def save_rank_state(rank_state: dict, path: Path) -> None:
    """``{"generator": ByteTensor, "positions": {role: drawn}, ...}`` → safetensors: the tensor as
    a tensor, everything else as JSON metadata (no pickle)."""
    meta = {k: v for k, v in rank_state.items() if k != "generator"}
    meta["positions"] = {str(k): int(v) for k, v in meta.get("positions", {}).items()}
    save_file({"generator": rank_state["generator"].contiguous()}, str(path),
              metadata={"selfsup": json.dumps(meta)})


def load_rank_state(folder: Path, rank: int) -> dict | None:
    """This rank's state from ``rank-R.safetensors``; None if absent (no other file is read: a
    pickle beside it is never opened)."""
    path = folder / f"rank-{rank}.safetensors"
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["selfsup"])
            generator = f.get_tensor("generator")
        meta["positions"] = {int(k): int(v) for k, v in meta.get("positions", {}).items()}
        return {**meta, "generator": generator}
    return None


def _discard(path: Path) -> None:
    """Delete a checkpoint: renamed out of the ``step-N`` names first (atomic), so that a kill in
    the middle of the delete never leaves a half-deleted ``step-N`` that still has its
    ``trainer.json`` and would pass for complete."""
    trash = path.with_name(f".old-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def load_checkpoint(accelerator, path: Path) -> tuple[dict, dict | None]:
    """Restore accelerate's state; return (trainer state, this rank's state or None). Any
    failure (a truncated or damaged file, tensors that do not fit) is a one-line
    :class:`CheckpointError`; the caller decides whether an older checkpoint is tried."""
    try:
        trainer_state = json.loads((path / TRAINER_FILE).read_text())
        same_world = trainer_state.get("world_size") == accelerator.num_processes
        rank_state = load_rank_state(path, accelerator.process_index) if same_world else None
        if same_world and rank_state is None:
            raise FileNotFoundError(f"rank-{accelerator.process_index}.safetensors is missing")
        if (why := damage(path)) is not None:
            raise CheckpointError(f"checkpoint {path} cannot be loaded (damaged: {why})")
        accelerator.load_state(str(path))
        if (why := _loaded_weight_problem(accelerator, path)) is not None:
            raise CheckpointError(f"checkpoint {path} cannot be loaded ({why})")
    except CheckpointError:
        raise
    except Exception as e:
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({reason[:300]})") from None
    return trainer_state, rank_state


def _loaded_weight_problem(accelerator, path: Path) -> str | None:
    """What is wrong with the weights just loaded (NaN/inf), or with the dtypes in the file
    (an integer tensor is cast into a float parameter silently); None when they are fine."""
    file = path / "model.safetensors"
    for model in accelerator._models:
        state = model.state_dict()
        if file.is_file():
            with safe_open(str(file), "pt") as f:
                for k in f.keys():
                    want = state.get(k) if k in state else state.get(f"module.{k}")
                    if want is not None and want.is_floating_point() and f.get_slice(k).get_dtype() not in \
                            ("F16", "BF16", "F32", "F64"):
                        return f"weight {k} has dtype {f.get_slice(k).get_dtype()}, not a floating type"
        if (why := weight_problem(state)) is not None:
            return why
    return None


def export_backbone(backbone: torch.nn.Module, run_dir: str | Path, metadata: dict,
                    names: tuple[str, ...] | None = None) -> Path:
    """Write ``export/backbone-stepN.safetensors`` and refresh ``export/backbone.safetensors``
    (``names``: these file names in ``export/`` instead, e.g. checkpoint.keep_best's
    ``backbone-best.safetensors``; the first is returned).

    The format is :mod:`selfsup_io.export_format`'s (docs/formats.md): weights only, loadable
    with timm + safetensors; ``metadata`` goes, as JSON, under the safetensors metadata key
    ``selfsup``. Each name is written to a temp file and renamed.
    """
    out = Path(run_dir) / fmt.EXPORT_DIR
    data = fmt.export_bytes(backbone.state_dict(), metadata)
    targets = [out / n for n in names or (fmt.step_export_name(metadata["step"]), fmt.LATEST_EXPORT)]
    for target in targets:
        try:
            write_export({}, metadata, target, data=data)
        except Exception as e:
            err = storage_error(e, target, f"the checkpoint of step {metadata['step']} is complete "
                                "and its export is written when the run resumes")
            if err is None:
                raise
            raise err from None
    return targets[0]
