"""Reading checkpoint files of other frameworks without running anything in them.

A ``.pth`` file is a pickle, and unpickling can call any function the file names: a crafted
checkpoint runs code the moment a careless loader opens it. So a file is read in one of two ways
only:

* **safetensors**: tensors and a string header, nothing executable by construction;
* **torch.load(weights_only=True)**: torch's restricted unpickler, which builds tensors, containers
  and numbers only, plus the types in :data:`HARMLESS`, allow-listed for the duration of the
  load (``torch.serialization.safe_globals``). They are plain records whose reconstruction sets
  attributes and calls no user code: DINO and timm's train script store their
  ``argparse.Namespace`` of arguments; paths appear in such namespaces.

Anything else (a class of the framework that saved it, a function, ``weights_only=False``-only
content) is refused with one line that names the type, and nothing of the file is executed.

One reader for every package: the evaluator, ``selfsup-export`` and the trainer's ``model.init``
all open user files here (``selfsup_io`` is the package both sides may import).
"""

from __future__ import annotations

import argparse
import pathlib
import re
import warnings
from collections import OrderedDict

import torch

from selfsup_io.errors import LoadError

HARMLESS = (argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath,
            pathlib.PureWindowsPath, OrderedDict)
_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def is_safetensors(path: str) -> bool:
    """A safetensors file starts with an 8-byte header length and a JSON header ``{...``."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 31)


def load_file(path: str) -> tuple[object, str]:
    """``(object, how)``: a safetensors file as its tensor dict, anything else through
    ``torch.load(weights_only=True)`` with :data:`HARMLESS` allowed. One-line :class:`LoadError`
    for unreadable or refused files."""
    try:
        if is_safetensors(path):
            from safetensors.torch import load_file as st_load

            return st_load(path), "safetensors"
    except OSError as e:
        raise LoadError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # a damaged header
        raise LoadError(f"{path} is not a readable safetensors file ({' '.join(str(e).split())[:200]})") from None
    try:
        with torch.serialization.safe_globals(list(HARMLESS)), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Detected pickle protocol 4": the refusal says enough
            return torch.load(path, map_location="cpu", weights_only=True, mmap=False), "torch.load(weights_only=True)"
    except OSError as e:
        raise LoadError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # UnpicklingError and the many errors of damaged zip/pickle data
        msg = str(e)
        m = _GLOBAL.search(msg)
        if m:
            raise LoadError(f"{path}: refusing to unpickle {m.group(1)}: only tensors, containers and "
                            f"known-harmless types ({', '.join(t.__module__ + '.' + t.__name__ for t in HARMLESS[:2])}, ...) are "
                            "loaded (torch.load weights_only=True), nothing in the file was run; save "
                            "the weights as a plain state dict or safetensors") from None
        flat = " ".join(msg.split())
        detail = flat.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation")[0].strip()
        reason = detail or flat[:200] or type(e).__name__
        raise LoadError(f"{path} is not a checkpoint torch.load(weights_only=True) can read ({reason[:200]}); "
                        "nothing in the file was run") from None
