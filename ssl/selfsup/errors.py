"""Errors a user can fix, each reported by ``selfsup-train`` as one line with exit code 2.

Every kind the trainer raises is defined here, below everything else, so that the modules raising
them (the recipe loader, the objectives, the data path, checkpoints) need not import one another,
and the CLI catches their common base :class:`~selfsup_io.errors.UserError` and nothing wider.
"""

from __future__ import annotations

import sys

from selfsup_io.errors import ShardSpecError, TrackerError, UserError  # noqa: F401  (one import site)


def warn(message: str) -> None:
    """One warning line on stderr, as every part of selfsup-train reports what a user may want to
    change but need not (the caller decides which process speaks)."""
    print(f"selfsup-train: warning: {message}", file=sys.stderr, flush=True)


class RecipeError(UserError):
    """A recipe problem, reported to the user as one line."""


class DataError(UserError):
    """Bad data configuration (one-line message naming the key and the fix)."""


class ModelError(UserError):
    """A model-configuration problem, reported as one line."""


class CheckpointError(UserError):
    """A checkpoint path that is not one, or a damaged checkpoint (one-line message)."""


class StorageError(UserError, OSError):
    """A checkpoint or export could not be written for lack of space (one-line message)."""


class RunDirError(UserError):
    """The run directory is in use, or the checkpoint does not fit the recipe (one line)."""
