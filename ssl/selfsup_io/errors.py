"""The base of every error a user can fix, shared by both packages.

A command line reports a :class:`UserError` as one line with exit status 2 and lets anything else
through as a traceback: an error in selfsup's own code must not pass for a user's mistake, as it
did while the CLIs turned every ``ValueError`` into one line. Each package's kinds subclass it:
:mod:`selfsup.errors` for training, ``selfsup_eval.checkpoint.EvalError`` for evaluation; the two
defined here are raised on both sides.

:class:`UsageError` is what the Python API raises for bad input (``selfsup.train``,
``selfsup_eval.evaluate``, ``selfsup_eval.embed``): its message is exactly the line the matching
CLI prints before exiting with status 2 (``selfsup-train: error: ...`` / ``selfsup-eval: error:
...``), because the CLIs are thin wrappers over the API and a notebook and a shell must see the
same words.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem the user can fix, reported as one line naming what to change."""


class ShardSpecError(UserError):
    """A shard specification that resolves to nothing usable (one-line message)."""


class TrackerError(UserError):
    """A tracker that is unknown, not installed or cannot start (one-line message)."""


class UsageError(UserError):
    """Bad input as the CLI's one error line (``PROG: error: ...``), raised by the Python API."""


class LoadError(UserError):
    """A checkpoint or export file that cannot be used (one line): raised by the shared readers
    (:mod:`selfsup_io.safe_load`, :mod:`selfsup_io.layouts`, :mod:`selfsup_io.export_format`), so
    a file the evaluator refuses is refused the same way by the trainer's ``model.init``;
    ``selfsup_eval.checkpoint.EvalError`` is this class."""
