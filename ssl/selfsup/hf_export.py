"""The latest export also as ``RUN_DIR/export/hf/``: a folder in timm's Hugging Face layout.

``config.json`` (architecture, model arguments, the preprocessing) + ``model.safetensors`` is what
``timm.models.save_for_hf`` writes and what timm reads back without selfsup installed::

    timm.create_model("local-dir:RUN_DIR/export/hf", pretrained=True)      # config.json decides
    timm.create_model("resnet50", pretrained=True, num_classes=0,
                      pretrained_cfg_overlay=dict(file="RUN_DIR/export/hf/model.safetensors"))

and what a user uploads to the Hub as it is (then ``hf-hub:user/repo``). The config is written
by timm's own ``save_config_for_hf``, so its fields follow timm; the weights are written here
(contiguous CPU copies, as ``backbone.safetensors``: a channels_last model's tensors would
otherwise be refused by safetensors).

The preprocessing recorded is selfsup-eval's protocol: the recipe's ``augment.size``, mean and
std, shorter side resized to the input size (``crop_pct`` 1.0), bilinear.

A backbone trained with ``model.small_stem`` has a stem no timm model argument can express, so
timm alone could not rebuild it: no ``hf/`` folder is written for it (``backbone.safetensors``
and its metadata remain the way to load it, docs/formats.md).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from selfsup.checkpoint import umask

HF_DIR = "hf"


def export_hf(backbone: torch.nn.Module, run_dir: str | Path, meta: dict) -> Path | None:
    """Write ``RUN_DIR/export/hf`` for the backbone (replacing the previous one as a whole).

    Returns the folder, or None for a ``small_stem`` backbone (see the module docstring).
    """
    if meta.get("small_stem"):
        return None
    from timm.models._hub import save_config_for_hf  # what timm.models.save_for_hf calls

    export = Path(run_dir) / "export"
    final, tmp, old = export / HF_DIR, export / f".tmp-{HF_DIR}", export / f".old-{HF_DIR}"
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in backbone.state_dict().items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        size = int(meta["input_size"])
        save_config_for_hf(backbone, str(tmp / "config.json"), data_config={
            "input_size": (3, size, size), "mean": tuple(meta["mean"]), "std": tuple(meta["std"]),
            "crop_pct": 1.0, "crop_mode": "center", "interpolation": "bilinear"})
        mode = 0o666 & ~umask()  # safetensors creates 0600 files: follow the umask instead
        for f in tmp.iterdir():
            os.chmod(f, mode)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # two renames: a kill between them leaves no hf/ (the next export writes it), never a mix
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final
