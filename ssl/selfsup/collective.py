"""Decisions every process must take together.

When one rank fails (a tracker that does not start, a lock it cannot take, a checkpoint it cannot
read) or gets a stop signal, the others must learn it at the same point, or they wait forever in
their next collective for a rank that has gone. Every such site asks :func:`any_rank`.
"""

from __future__ import annotations

import torch


def any_rank(acc, flag: bool) -> bool:
    """True on every process when ``flag`` is true on at least one (a sum over ranks). One
    process needs no collective, which spares a device sync where this runs every step."""
    if acc.num_processes == 1:
        return bool(flag)
    total = acc.reduce(torch.tensor([1.0 if flag else 0.0], device=acc.device), "sum")
    return bool(total.item() > 0)
