"""Recipes: OmegaConf YAML checked against a typed schema.

A recipe is a YAML file; ``base: other.yaml`` (or a list of them, paths relative to the recipe)
pulls in shared settings first. Command-line ``key=value`` overrides are applied last. The merged
result is validated against the dataclasses below, so a misspelt or unknown key fails at once with
one line naming it, instead of being silently ignored three hours into a run. Each field is
declared with :func:`selfsup.schema.key`: its default, value rule, resume class and one-line doc
in one place (docs/recipe.md is generated from them).

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

from selfsup.data import DECODE_MODES  # the loader owns its modes
from selfsup.errors import RecipeError  # noqa: F401  (also imported from here by callers)
from selfsup.schema import (FREE, STRUCTURAL, at_least, at_most, below_one, fields, key, negative, nonempty,
                            one_of, optional_bool, pair, positive, probability, unit_interval)

LR_SCALING = ("linear", "sqrt", "none")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class RunConfig:
    dir: str = key("runs/default", "output directory: checkpoints, exports, metrics.jsonl, recipe.yaml",
                   check=nonempty("a directory"), resume=FREE)
    seed: int = key(0, "seed of every random choice (weights, data order, views, masks)", check=at_least(0))


@dataclass
class DataConfig:
    train: Optional[str] = key(None, "training shards: a directory with one index `.json`, an index `.json`, a "
                               "brace pattern `/d/train-{000000..000127}.tar`, `pipe:` or `http(s)://` URLs, "
                               "several joined by `::` (docs/formats.md)")
    val: Optional[str] = key(None, "labelled shards for the online monitor (optional)", resume=FREE)
    samples_per_epoch: Optional[int] = key(None, "epoch length, only needed when the shards have no index",
                                           check=at_least(1, optional=True))
    decode: str = key("cpu", "`cpu`: workers decode and cut the views; `device`: workers read bytes, JPEGs are "
                      "decoded and cropped batched on the training device (nvJPEG on a GPU)",
                      check=one_of(*DECODE_MODES))
    num_workers: int = key(2, "decoding workers per process (may change on a resume: exact epochs split the rest "
                           "of the epoch anew, docs/elastic-epochs.md)", check=at_least(0), resume=FREE)
    shuffle_buffer: int = key(2000, "samples shuffled together: the block of exact epochs, else the shuffle buffer "
                              "per worker", check=at_least(1))
    max_corrupt_fraction: float = key(
        0.1, "stop (one line) once more than this fraction of the samples drawn were unreadable (judged "
        "after 1,000 samples or an epoch; 0: the first one stops the run): a data set that bad is not the "
        "one the user meant to train on", check=probability(), resume=FREE)
    record_keys: bool = key(False, "write the keys each process used to `RUN_DIR/seen/epoch-E/rank-R.txt` "
                            "(docs/elastic-epochs.md)", resume=FREE)


@dataclass
class AugmentConfig:
    """Two-view (SimCLR-style) augmentation, applied per sample on the whole batch."""

    # at most selfsup-eval's limit on an export's input_size (selfsup_eval.checkpoint.MAX_INPUT_SIZE;
    # 100,000 used to surface as "none of the images could be decoded")
    size: int = key(32, "side of every view (px), at most the largest input an export may have",
                    check=at_most(2, 2048))
    scale: List[float] = key(doc="RandomResizedCrop area range, over the whole original image",
                             check=pair(0, 1), factory=lambda: [0.08, 1.0])
    ratio: List[float] = key(doc="RandomResizedCrop aspect range", check=pair(0), factory=lambda: [3 / 4, 4 / 3])
    hflip_p: float = key(0.5, "horizontal flip probability", check=probability())
    jitter_p: float = key(0.8, "colour jitter probability", check=probability())
    brightness: float = key(0.4, "colour jitter: brightness strength", check=at_least(0))
    contrast: float = key(0.4, "colour jitter: contrast strength", check=at_least(0))
    saturation: float = key(0.2, "colour jitter: saturation strength", check=at_least(0))
    hue: float = key(0.1, "colour jitter: hue strength", check=at_most(0, 0.5))
    gray_p: float = key(0.2, "grayscale probability", check=probability())
    blur_p: float = key(0.5, "Gaussian blur probability", check=probability())
    blur_sigma: List[float] = key(doc="Gaussian blur sigma range", check=pair(0), factory=lambda: [0.1, 2.0])
    blur_kernel_frac: float = key(0.1, "blur kernel side as a fraction of the view side", check=probability())
    solarize_p: float = key(0.0, "solarize probability", check=probability())
    mean: List[float] = key(doc="normalisation mean (1 or 3 numbers)", factory=lambda: [0.485, 0.456, 0.406])
    std: List[float] = key(doc="normalisation std (as many as mean)", factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class ModelConfig:
    name: str = key("resnet18", "any timm model name", check=nonempty("a timm model name"), resume=STRUCTURAL)
    kwargs: Dict[str, Any] = key(doc="extra `timm.create_model` keyword arguments", factory=dict,
                                 resume=STRUCTURAL)
    small_stem: bool = key(False, "3×3 stride-1 stem without max-pool for 28–64 px images (ResNets)",
                           resume=STRUCTURAL)
    zero_init_last: Optional[bool] = key(
        None, "`false`: residual blocks' last norm weight starts at one, as torchvision's ResNets (MoCo v2's "
        "and JigClu's official code); `null`: timm's zero init. Models without residual zero-init are "
        "unaffected", check=optional_bool())
    init: str = key("random", "where the backbone starts: `random`, `timm` (timm's pretrained weights, found "
                    "offline) or a checkpoint path in any layout selfsup-eval reads "
                    "(docs/continued-pretraining.md)", check=nonempty("random, timm or a checkpoint path"))
    init_key: Optional[str] = key(None, "`model.init` PATH: the entry holding the state dict (default: detected, "
                                  "as `selfsup-eval --checkpoint-key`)")
    init_prefix: Optional[str] = key(None, "`model.init` PATH: the backbone's name prefix (default: detected, as "
                                     "`selfsup-eval --prefix`)")
    channels_last: bool = key(False, "channels-last memory format for every module the objective trains")
    compile: bool = key(False, "`torch.compile` the backbone method the objective calls, in every copy it runs "
                        "(I-JEPA: encoders and predictor as one graph with dynamic mask lengths)")


@dataclass
class OptimConfig:
    name: str = key("adamw", "any timm optimizer: `lars`, `sgd`, `adamw`, `lamb`, ... (timm's `sgd` is Nesterov "
                    "SGD, `momentum` the classical one)", resume=STRUCTURAL)
    lr: float = key(1e-3, "learning rate for a global batch of 256 (global batch = batch_size × processes × "
                    "grad_accum), scaled by `lr_scaling`", check=positive())
    lr_scaling: str = key("linear", "how lr follows the global batch", check=one_of(*LR_SCALING))
    weight_decay: float = key(1e-6, "weight decay", check=at_least(0))
    weight_decay_end: Optional[float] = key(None, "cosine weight-decay schedule to this value (I-JEPA)",
                                            check=at_least(0, optional=True))
    momentum: float = key(0.9, "momentum (SGD-type optimizers; beta1 is the optimizer's own)", check=below_one())
    nesterov: Optional[bool] = key(None, "`true`/`false` overrides the optimizer's Nesterov default (`null`: keep "
                                   "it; ignored by optimizers without the switch)", check=optional_bool())
    decay_bias_and_norm: bool = key(False, "`true`: weight decay on biases and norms too, as MoCo v2's and "
                                    "JigClu's official SGD; `false`: timm's groups exempt them")
    warmup_epochs: float = key(0.0, "linear warm-up length; then a cosine from the peak to `min_lr` over the "
                               "remaining steps (the official shape), stepped per optimizer update",
                               check=at_least(0))
    warmup_lr: float = key(0.0, "warm-up start (absolute: only lr follows the global batch)", check=at_least(0))
    min_lr: float = key(0.0, "end of the cosine (absolute)", check=at_least(0))
    clip_grad: Optional[float] = key(None, "gradient-norm clipping", check=positive(optional=True))
    layer_decay: Optional[float] = key(
        None, "layer-wise lr decay (timm's `param_groups_layer_decay`): the backbone's layer l of L trains at "
        "`lr × layer_decay^(L − l)`, heads at `lr` (docs/continued-pretraining.md); null: off",
        check=unit_interval(optional=True), resume=STRUCTURAL)  # the optimizer's param groups


@dataclass
class TrainConfig:
    epochs: float = key(100.0, "length in epochs", check=positive())
    max_steps: Optional[int] = key(None, "length in optimizer steps (wins over epochs when set)",
                                   check=at_least(1, optional=True))
    batch_size: int = key(256, "images per process per micro-batch", check=at_least(1))
    grad_accum: int = key(1, "micro-batches per optimizer step", check=at_least(1))
    precision: str = key("auto", "`auto` (bf16 on CUDA, else fp32), `bf16`, `fp32`", check=one_of(*PRECISIONS))
    cpu: bool = key(False, "force CPU even if a GPU is present")
    log_every: int = key(10, "steps between metrics.jsonl records", check=at_least(1), resume=FREE)


@dataclass
class CheckpointConfig:
    every_steps: int = key(500, "checkpoint interval in steps (0: only at the end and on a stop signal)",
                           check=at_least(0), resume=FREE)
    keep: int = key(2, "how many checkpoints to keep", check=at_least(0), resume=FREE)
    keep_best: bool = key(False, "keep the export with the best monitor k-NN as "
                          "`export/backbone-best.safetensors` (needs the monitor)", resume=FREE)


@dataclass
class MonitorConfig:
    every_steps: int = key(0, "online k-NN / collapse monitor interval (0: off)", check=at_least(0), resume=FREE)
    train: Optional[str] = key(None, "labelled shards for the monitor's k-NN memory (default data.train)",
                               resume=FREE)
    val: Optional[str] = key(None, "labelled shards it scores (default data.val)", resume=FREE)
    max_samples: int = key(5000, "samples drawn from each", check=at_least(1), resume=FREE)
    k: int = key(20, "neighbours", check=at_least(1), resume=FREE)
    temperature: float = key(0.07, "vote weight exp(s/T)", check=positive(), resume=FREE)
    min_vs_init: Optional[float] = key(
        None, "stop (exit 3) after two evaluations in a row more than this many k-NN points below the "
        "starting weights, e.g. -5 (docs/continued-pretraining.md)", check=negative(optional=True), resume=FREE)


@dataclass
class LogConfig:
    """Where metrics go besides ``RUN_DIR/metrics.jsonl`` (always written). Progress on stderr
    is a bar on a terminal and a plain line every SELFSUP_PROGRESS_SECONDS (60) otherwise."""

    trackers: List[str] = key(doc="experiment trackers besides metrics.jsonl (`tensorboard`, `wandb`, `mlflow`, "
                              "... accelerate's names)", factory=list, resume=FREE)
    project: str = key("selfsup", "the trackers' project / experiment name; the run is named after run.dir",
                       resume=FREE)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: Any = key(None, "replaced by the registered objective's Config")
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    log: LogConfig = field(default_factory=LogConfig)
    resume: str = key("auto", "`auto` (latest complete checkpoint in run.dir, if any), `none`, or a checkpoint "
                      "directory", check=nonempty("auto, none or a checkpoint directory"), resume=FREE)


def schema_fields(objective_name: str) -> list:
    """``(dotted key, field)`` of every recipe key for this objective: the shared sections and the
    objective's own ``Config`` under ``objective.`` (:mod:`selfsup.schema`)."""
    from selfsup.objectives import objective_config  # registry lives with the objectives

    base = [(k, f) for k, f in fields(Config) if k != "objective"]
    return base + list(fields(objective_config(objective_name), "objective."))


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

    check_values(cfg, schema_fields(name))  # values, not just types: train.batch_size=0 fails here, naming its key
    from selfsup.init_weights import default_normalisation

    aug = AugmentConfig()
    default_normalisation(cfg, (aug.mean, aug.std))  # model.init=timm: the weights' mean/std
    OmegaConf.set_readonly(cfg, True)
    return cfg
