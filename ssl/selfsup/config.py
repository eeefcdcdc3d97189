"""Recipes: OmegaConf YAML checked against a typed schema.

A recipe is a YAML file; ``base: other.yaml`` (or a list of them, paths relative to the recipe)
pulls in shared settings first. Command-line ``key=value`` overrides are applied last. The merged
result is validated against the dataclasses below, so a misspelt or unknown key fails at once with
one line naming it, instead of being silently ignored three hours into a run.

The ``objective`` section's schema belongs to the objective: each objective class declares a
``Config`` dataclass and the schema used is the one registered under ``objective.name``. Adding an
objective never touches this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from selfsup.errors import RecipeError  # noqa: F401  (also imported from here by callers)

# keys older recipes may still carry, and what replaced them
REMOVED_KEYS = {"data.decode_size": "every view is now cut from the whole original image and "
                "resized to augment.size (drop the key; data.decode=device decodes JPEGs on the GPU)"}


@dataclass
class RunConfig:
    dir: str = "runs/default"
    seed: int = 0


@dataclass
class DataConfig:
    train: Optional[str] = None  # shard spec, see docs/formats.md
    val: Optional[str] = None  # labelled shards for the online monitor
    samples_per_epoch: Optional[int] = None  # only needed when the shards have no index json
    decode: str = "cpu"  # cpu: workers decode + crop | device: JPEGs decoded on the training device
    num_workers: int = 2
    shuffle_buffer: int = 2000
    # the run stops (one line) once more than this fraction of the samples drawn so far could not
    # be read or decoded: a data set that bad is not the one the user meant to train on
    max_corrupt_fraction: float = 0.1


@dataclass
class AugmentConfig:
    """Two-view (SimCLR-style) augmentation, applied per sample on the whole batch."""

    size: int = 32
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: List[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: List[float] = field(default_factory=lambda: [0.1, 2.0])
    blur_kernel_frac: float = 0.1
    solarize_p: float = 0.0
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class ModelConfig:
    name: str = "resnet18"  # any timm model name
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs
    small_stem: bool = False  # 3x3 stride-1 conv1, no max-pool (28-64 px inputs)
    zero_init_last: Optional[bool] = None  # false: residual blocks' last norm starts at 1 (torchvision's default)
    channels_last: bool = False
    compile: bool = False


@dataclass
class OptimConfig:
    name: str = "adamw"  # timm optimizer name: sgd, momentum, adamw, lars, lamb, ...
    lr: float = 1e-3  # base learning rate for a global batch of 256
    lr_scaling: str = "linear"  # linear | sqrt | none: how lr follows the global batch
    weight_decay: float = 1e-6
    weight_decay_end: Optional[float] = None  # cosine weight-decay schedule (I-JEPA)
    momentum: float = 0.9
    nesterov: Optional[bool] = None  # None: the optimizer's default (timm's sgd: Nesterov; momentum: not)
    decay_bias_and_norm: bool = False  # weight decay on biases and norms too (MoCo v2's, JigClu's SGD)
    warmup_epochs: float = 0.0
    warmup_lr: float = 0.0  # absolute, as min_lr: only lr follows the global batch
    cosine_after_warmup: bool = True  # false: one cosine over the whole run (selfsup before 2026-12-02)
    min_lr: float = 0.0
    clip_grad: Optional[float] = None


@dataclass
class TrainConfig:
    epochs: float = 100.0
    max_steps: Optional[int] = None  # optimizer steps; wins over epochs when set
    batch_size: int = 256  # per process
    grad_accum: int = 1
    precision: str = "auto"  # auto (bf16 on CUDA, else fp32) | bf16 | fp32
    cpu: bool = False  # force CPU even if a GPU is present
    log_every: int = 10


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    keep: int = 2


@dataclass
class MonitorConfig:
    every_steps: int = 0  # 0 disables the online k-NN / collapse monitor
    train: Optional[str] = None  # labelled shards (defaults to data.train)
    val: Optional[str] = None  # labelled shards (defaults to data.val)
    max_samples: int = 5000
    k: int = 20
    temperature: float = 0.07


@dataclass
class LogConfig:
    """Where metrics go besides ``RUN_DIR/metrics.jsonl`` (always written). Progress on stderr
    is a bar on a terminal and a plain line every SELFSUP_PROGRESS_SECONDS (60) otherwise."""

    trackers: List[str] = field(default_factory=list)  # tensorboard, wandb, mlflow, comet_ml, aim...
    project: str = "selfsup"  # the tracker's project / experiment name; the run is named after run.dir


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: Any = None  # replaced by the registered objective's Config
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    log: LogConfig = field(default_factory=LogConfig)
    resume: str = "auto"  # auto (latest checkpoint in run.dir, if any) | none | PATH


def _load_yaml(path: Path, seen: tuple = ()) -> DictConfig:
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    if path.resolve() in seen:
        raise RecipeError(f"recipe {path} includes itself through 'base'")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # YAML syntax errors
        raise RecipeError(f"cannot parse recipe {path}: {str(e).splitlines()[0]}") from None
    bases = cfg.pop("base", None)
    if bases is None:
        return cfg
    merged = OmegaConf.create()
    for base in [bases] if isinstance(bases, str) else list(bases):
        merged = OmegaConf.merge(merged, _load_yaml(path.parent / base, seen + (path.resolve(),)))
    return OmegaConf.merge(merged, cfg)


def _explain(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None) or getattr(e, "key", None)
    msg = str(e).splitlines()[0]
    if key in REMOVED_KEYS:
        return f"recipe key '{key}' was removed: {REMOVED_KEYS[key]}"
    if "not in struct" in msg or "Key '" in msg and "not in" in msg:
        return f"unknown recipe key '{key}' (check the spelling; see docs/recipe.md)"
    return f"bad value for recipe key '{key}': {msg}"


def load_recipe(paths, overrides: list[str] = ()) -> DictConfig:
    """Recipe file(s) + ``key=value`` overrides → validated, typed config (read-only).

    ``paths`` is one recipe or a list merged in order (e.g. a method recipe, then a data recipe).
    """
    from selfsup.objectives import objective_config  # registry lives with the objectives

    if isinstance(paths, (str, Path)):
        paths = [paths]
    raw = OmegaConf.create()
    for path in paths or []:
        raw = OmegaConf.merge(raw, _load_yaml(Path(path)))
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} is not of the form key=value")
    try:
        raw = OmegaConf.merge(raw, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise RecipeError(f"bad override: {str(e).splitlines()[0]}") from None
    name = OmegaConf.select(raw, "objective.name", default="simclr")
    schema = OmegaConf.structured(Config)
    OmegaConf.set_struct(schema, False)
    schema.objective = OmegaConf.structured(objective_config(name))
    OmegaConf.set_struct(schema, True)
    OmegaConf.set_struct(schema.model.kwargs, False)  # free-form: passed to timm.create_model
    try:
        cfg = OmegaConf.merge(schema, raw)
    except OmegaConfBaseException as e:
        raise RecipeError(_explain(e)) from None
    from selfsup.recipe_checks import check_values

    check_values(cfg)  # values, not just types: train.batch_size=0 fails here, naming its key
    OmegaConf.set_readonly(cfg, True)
    return cfg
