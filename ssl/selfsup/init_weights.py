"""``model.init``: where a run's backbone starts (continued pretraining from public weights).

* ``random`` (default): timm's initialisation, as every run before this key;
* ``timm``: timm's pretrained weights for ``model.name``, found **offline**: the file
  ``model.kwargs.pretrained_cfg_overlay.file`` names, else the local Hugging Face cache
  (``hf_hub_id`` of the model's pretrained config), else torch hub's checkpoint folder (its
  ``url``). Nothing is downloaded at run time; a missing file is one line listing where it looked;
* a **path**: a checkpoint in any layout the evaluator reads (a selfsup export, official MoCo,
  DINO, I-JEPA, solo-learn, lightly, timm, torchvision, a plain state dict), with
  ``model.init_key`` / ``model.init_prefix`` choosing the state dict and prefix as
  ``--checkpoint-key`` / ``--prefix`` do for ``selfsup-eval``.

The file is read and matched by the same code as the evaluator's (:mod:`selfsup_io.safe_load`,
:mod:`selfsup_io.layouts`): safetensors or ``torch.load(weights_only=True)`` only, and a weight
of the backbone the file leaves uninitialised, or gives another shape, is one line before
anything trains. The weights go into the encoder the objective trains
(:meth:`~selfsup.objectives.base.Objective.online_backbone`); every momentum / target copy
(MoCo's key encoder, I-JEPA's target encoder) is then set equal to its online module, so all
start from the file. Heads and predictors keep their fresh initialisation.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

from selfsup.errors import RecipeError, warn
from selfsup_io.export_format import file_digest
from selfsup_io.layouts import load_weights, pick_state_dict, unused_note
from selfsup_io.safe_load import load_file

FLAGS = ("model.name/model.kwargs", "model.init_key", "model.init_prefix")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def pretrained_cfg(name: str, kwargs: dict) -> dict:
    """timm's pretrained config of ``name`` (with its tag), overlaid by
    ``model.kwargs.pretrained_cfg_overlay``; no model is built and nothing is downloaded."""
    import timm.models

    cfg = timm.models.get_pretrained_cfg(name)
    out = cfg.to_dict() if cfg is not None else {}
    out.update(dict(kwargs.get("pretrained_cfg_overlay") or {}))
    return out


def timm_weights_file(name: str, kwargs: dict) -> Path:
    """The local file of timm's pretrained weights for ``name``; one line if there is none."""
    cfg = pretrained_cfg(name, kwargs)
    looked = []
    if cfg.get("file"):
        path = Path(os.path.expanduser(str(cfg["file"])))
        if path.is_file():
            return path
        looked.append(f"pretrained_cfg_overlay.file {path}")
    if cfg.get("hf_hub_id"):
        from huggingface_hub import constants, try_to_load_from_cache

        repo = cfg["hf_hub_id"]
        for fname in [cfg.get("hf_hub_filename")] if cfg.get("hf_hub_filename") else WEIGHT_FILES:
            found = try_to_load_from_cache(repo, fname)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
        looked.append(f"the Hugging Face cache {constants.HF_HUB_CACHE} for {repo}")
    if cfg.get("url"):
        import torch.hub

        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(str(cfg["url"]).split("?")[0])
        if path.is_file():
            return path
        looked.append(f"torch hub's {path}")
    where = "; ".join(looked) or "timm has no pretrained config for it"
    raise RecipeError(f"model.init=timm: no local pretrained weights for {name} (looked in {where}); "
                      "nothing is downloaded at run time: fetch them once (e.g. timm.create_model("
                      f"'{name}', pretrained=True) on a machine with network, HF_HOME as here) or set "
                      "model.kwargs.pretrained_cfg_overlay.file=PATH")


def init_file(cfg) -> Path | None:
    """The file ``model.init`` names (None for ``random``)."""
    init = cfg.model.init
    if init in ("random", "", None):
        return None
    if init == "timm":
        return timm_weights_file(cfg.model.name, OmegaConf.to_container(cfg.model.kwargs, resolve=True))
    path = Path(os.path.expanduser(str(init)))
    if not path.is_file():
        raise RecipeError(f"model.init: {init} is not a file (random, timm, or a checkpoint path)")
    return path


def default_normalisation(cfg, defaults: tuple[list, list]) -> None:
    """With ``model.init=timm``: ``augment.mean/std`` left at the schema's defaults become the
    weights' (their pretrained config); a recipe that set other values keeps them, with one
    warning line. Called by the recipe loader before the recipe is frozen, so the run's
    recipe.yaml, its exports and the monitor all use the values the run used."""
    if cfg.model.init != "timm":
        return
    pc = pretrained_cfg(cfg.model.name, OmegaConf.to_container(cfg.model.kwargs, resolve=True))
    if not pc.get("mean") or not pc.get("std"):
        return
    theirs = [float(v) for v in pc["mean"]], [float(v) for v in pc["std"]]
    ours = [float(v) for v in cfg.augment.mean], [float(v) for v in cfg.augment.std]
    if ours == theirs:
        return
    if ours == (list(defaults[0]), list(defaults[1])):
        cfg.augment.mean, cfg.augment.std = theirs
    else:
        warn(f"augment.mean/std {ours[0]}/{ours[1]} differ from the pretrained weights' "
             f"{theirs[0]}/{theirs[1]} ({cfg.model.name}); using the recipe's")


def start_from_init(objective, cfg) -> dict | None:
    """Load ``model.init`` into the objective's online backbone and copy it into every momentum
    target. Returns ``{"source", "sha256", "checkpoint_key", "prefix", "note"}`` (provenance for the
    exports, which selfsup-eval --baseline init reads), None for
    ``random``. Every error is one line (:class:`~selfsup_io.errors.LoadError` or RecipeError)."""
    path = init_file(cfg)
    if path is None:
        return None
    where = f"model.init {path}"
    obj, _how = load_file(str(path))
    state, key = pick_state_dict(obj, cfg.model.init_key or None, where, key_flag="model.init_key")
    online = objective.online_backbone()
    match = load_weights(online, state, where, cfg.model.init_prefix, flags=FLAGS)
    for source, target in objective.momentum_pairs():
        target.load_state_dict(source.state_dict())
    return {"source": str(path.resolve()), "sha256": file_digest(path), "checkpoint_key": key,
            "prefix": match["prefix"], "note": unused_note(where, match, key)}
