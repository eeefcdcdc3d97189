"""What the trainer writes about its export: the export's metadata (docs/formats.md; the format
itself is :mod:`selfsup_io.export_format`'s) and the ``trainer.json`` record of where the exported
backbone sits in the objective's state dict, so that ``selfsup-export`` need not know objectives."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


def export_metadata(cfg, objective, state: dict, epochs: float, run_dir: Path) -> dict:
    """The ``selfsup`` metadata of the export of ``objective.backbone`` at ``state["step"]``,
    with the run's ``init`` provenance when it started from a file (``--baseline init``)."""
    meta = {"model_name": cfg.model.name,
            "model_kwargs": {**OmegaConf.to_container(cfg.model.kwargs), "num_classes": 0},
            "small_stem": cfg.model.small_stem, "input_size": cfg.augment.size,
            "mean": list(cfg.augment.mean), "std": list(cfg.augment.std),
            "feature_dim": int(objective.backbone.num_features),
            "pool": objective.export_pool, "objective": objective.name,
            "step": state["step"], "epoch": round(epochs, 4), "run": str(run_dir)}
    if state.get("init") is not None:
        meta["init"] = dict(state["init"])
    return meta


def export_record(objective) -> dict:
    """Which tensors of the objective's state dict are the exported backbone, and its pool."""
    name = next(n for n, m in objective.named_modules() if m is objective.backbone)
    return {"prefix": f"{name}.", "pool": objective.export_pool}
