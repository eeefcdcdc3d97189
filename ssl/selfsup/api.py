"""``selfsup.train(recipe, **overrides)``: the Python API of ``selfsup-train`` for notebooks.

The same recipe resolution and checks as the CLI (:func:`selfsup.cli.run_training`): recipe
file(s) merged in order, then the overrides. An override's key is the recipe's dotted key, given
as ``**{"run.dir": "runs/x"}`` or with ``__`` for the dots (``run__dir="runs/x"``); a value that is
not a string is written as JSON (``train__max_steps=20``, ``model__compile=False``). Bad input
raises :class:`selfsup_io.errors.UsageError` with the CLI's line (``selfsup-train: error: ...``).
"""

from __future__ import annotations

import json
from pathlib import Path


def override(key: str, value) -> str:
    text = value if isinstance(value, str) else json.dumps(value.as_posix() if isinstance(value, Path) else value)
    return f"{key.replace('__', '.')}={text}"


def train(recipe, accept_changes: bool = False, **overrides) -> str:
    """Pretrain per ``recipe`` (a path or a list merged in order); returns the run directory."""
    from selfsup.cli import run_training

    recipes = [str(recipe)] if isinstance(recipe, (str, Path)) else [str(r) for r in recipe]
    return run_training(recipes, [override(k, v) for k, v in overrides.items()], accept_changes)
