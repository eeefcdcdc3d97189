"""Checkpoint checksums: a file damaged in place (a bit flip, a block rewritten by a failing disk,
a copy that stopped early and was padded) must not load as if it were good.

A truncated safetensors or zip file fails to load on its own; a flipped byte inside a tensor does
not (it is just another number). So when a checkpoint is written, the main process records the
sha256 of every file in it in ``checksums.json`` (written last in the temp directory, after all
ranks have finished and after ``trainer.json``; the rename of that directory is what makes the
checkpoint complete); loading verifies them first, on every rank, and treats a
mismatch like any other damage (:mod:`selfsup.resume` falls back to the previous checkpoint under
``resume=auto``). Checkpoints written before this file existed load without the check.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from selfsup_io.export_format import file_digest

CHECKSUM_FILE = "checksums.json"


sha256 = file_digest  # of a file's bytes, read in blocks (one implementation, selfsup_io)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE)


def write_checksums(folder: Path) -> None:
    """``folder/checksums.json``: {relative path: sha256} of every file in it, fsynced."""
    sums = {str(p.relative_to(folder)): sha256(p) for p in _files(folder)}
    path = folder / CHECKSUM_FILE
    with open(path, "w") as f:
        f.write(json.dumps({"sha256": sums}, indent=1))
        f.flush()
        os.fsync(f.fileno())


def damage(folder: Path) -> str | None:
    """None when every file listed in ``checksums.json`` is there with its recorded sha256 (or the
    checkpoint predates checksums); else a short reason naming the first bad file."""
    path = folder / CHECKSUM_FILE
    if not path.is_file():
        return None
    try:
        sums = json.loads(path.read_text())["sha256"]
        items = sorted(sums.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{CHECKSUM_FILE} is unreadable"
    for name, digest in items:
        f = folder / name
        if not f.is_file():
            return f"{name} is missing"
        if sha256(f) != digest:
            return f"{name} does not match the checksum recorded when it was written"
    return None
