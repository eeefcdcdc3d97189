"""Weights that load without error but are not weights: NaN/inf values, integer tensors.

``load_state_dict`` copies whatever it is given: a NaN tensor stays NaN (k-NN then reports chance,
25.00 on four classes, with exit 0; L-BFGS crashes; ``selfsup-export`` writes it on), and an
integer tensor is cast into the float parameter without a word. The evaluator, the exporter and
the trainer's checkpoint loader all call :func:`weight_problem` on what they are about to load and
refuse it in one line.
"""

from __future__ import annotations

import torch


def weight_problem(tensors: dict, model_state: dict | None = None) -> str | None:
    """None when every tensor is usable; else what is wrong with the first one that is not: a
    floating tensor with NaN/inf values, or (given the model's ``state_dict()``) a tensor that is
    not floating where the model's is. Buffers such as BatchNorm's integer
    ``num_batches_tracked`` are compared with the model's own dtype, so they pass."""
    for name, t in tensors.items():
        if not torch.is_tensor(t):
            continue
        want = model_state.get(name) if model_state is not None else None
        if want is not None and torch.is_tensor(want) and want.is_floating_point() and not t.is_floating_point():
            return f"weight {name} has dtype {str(t.dtype).replace('torch.', '')}, not a floating type"
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            return f"weight {name} has {bad} NaN/inf value(s) of {t.numel()}"
    return None
