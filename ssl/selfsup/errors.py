"""Errors a user can fix, each reported by the CLIs as one line with exit code 2.

They live in a module of their own, below everything else, so that the modules raising them
(the recipe loader, the objectives, the data path) need not import one another: the recipe loader
reads the objectives' registry, and the objectives must not import the recipe loader back.
"""

from __future__ import annotations

import sys


def warn(message: str) -> None:
    """One warning line on stderr, as every part of selfsup-train reports what a user may want to
    change but need not (the caller decides which process speaks)."""
    print(f"selfsup-train: warning: {message}", file=sys.stderr, flush=True)


class RecipeError(ValueError):
    """A recipe problem, reported to the user as one line."""
