"""``selfsup-export SOURCE OUT.safetensors``: any backbone checkpoint → a selfsup export.

So that both paths meet at one format (docs/formats.md, exported backbone): whatever
``selfsup-eval`` can read, ``selfsup-export`` writes as the file every tool and user loads with
timm + safetensors alone. SOURCE is

* a **training checkpoint** of selfsup: ``RUN/checkpoints/step-N`` (or ``RUN``, its latest complete
  checkpoint). Read through the public layout only (this package never imports the trainer):
  ``trainer.json`` (step), the model weights accelerate saved (``model.safetensors``, else
  ``pytorch_model.bin`` through torch.load(weights_only=True)) and the recipe it was written with
  (``step-N/recipe.yaml``; ``RUN/recipe.yaml`` for checkpoints older than that copy, as a resume
  with ``--accept-changes`` rewrites the run's recipe): model, input size, mean/std, objective.
  The backbone is the weights under the objective's backbone
  prefix (``backbone.``; for I-JEPA the encoder ``objective.export`` names, :func:`backbone_prefix`);
* a checkpoint of **another framework** (the layouts of :mod:`selfsup_eval.foreign`), with
  ``--model TIMM_NAME`` and the same options as ``selfsup-eval``.

The output is written to a temporary name and renamed (never half-written), with the usual file
permissions (umask), and read back through the evaluator's own metadata check before it counts.
Bad input: one ``selfsup-export: error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from selfsup_eval.checkpoint import EvalError
from selfsup_eval.foreign import build_timm, foreign_metadata
from selfsup_io import export_format as fmt
from selfsup_io.export_format import build_model, has_selfsup_metadata, validate_metadata
from selfsup_io.layouts import load_weights, pick_state_dict, unused_note
from selfsup_io.safe_load import load_file


def legacy_export_record(objective: dict) -> dict:
    """What a checkpoint written before ``trainer.json`` recorded its ``export`` exported: I-JEPA
    its context encoder (``encoder.vit.``, unless its recipe's ``objective.export`` said
    ``target``) pooled over patch tokens; everything else its ``backbone.`` (detected), pooled by
    the head. Newer checkpoints say so themselves (the trainer writes the record)."""
    if objective.get("name") == "ijepa":
        target = objective.get("export", "context") == "target"
        return {"prefix": "target.vit." if target else "encoder.vit.", "pool": "mean_patch"}
    return {"prefix": None, "pool": "head"}


def from_training_checkpoint(source: Path) -> tuple[torch.nn.Module, dict, str]:
    """(model with the backbone's weights, export metadata, note) from a selfsup checkpoint."""
    import yaml

    ckpt = source if (source / fmt.TRAINER_FILE).is_file() else fmt.latest_checkpoint(source)
    if ckpt is None:
        raise EvalError(f"{source} holds no complete training checkpoint (checkpoints/step-N/{fmt.TRAINER_FILE})")
    run = ckpt.parent.parent
    try:
        state = json.loads((ckpt / fmt.TRAINER_FILE).read_text())
        own = ckpt / "recipe.yaml"  # what the trainer's own export of this step was written with
        recipe = yaml.safe_load((own if own.is_file() else run / "recipe.yaml").read_text())
        m, aug = recipe["model"], recipe["augment"]
        objective = recipe["objective"]["name"]
        record = state.get("export") or legacy_export_record(recipe["objective"])
        meta = {"model_name": m["name"], "model_kwargs": {**(m.get("kwargs") or {}), "num_classes": 0},
                "small_stem": bool(m.get("small_stem", False)), "input_size": aug["size"],
                "mean": list(aug["mean"]), "std": list(aug["std"]), "pool": record["pool"],
                "objective": objective, "step": int(state["step"]), "epoch": state.get("epoch"), "run": str(run)}
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as e:
        raise EvalError(f"{ckpt}: cannot read the run's recipe.yaml / {fmt.TRAINER_FILE} ({type(e).__name__}: {e})") from None
    validate_metadata(meta, str(run / "recipe.yaml"))
    weights = next((ckpt / name for name in fmt.MODEL_WEIGHTS if (ckpt / name).is_file()), None)
    if weights is None:
        raise EvalError(f"{ckpt} has no {' or '.join(fmt.MODEL_WEIGHTS)}")
    obj, _ = load_file(str(weights))
    sd, key = pick_state_dict(obj, None, str(weights))
    model = build_model(meta)
    match = load_weights(model, sd, str(weights), record["prefix"])
    return model, meta, unused_note(str(weights), match, key)


def from_foreign(source: Path, args) -> tuple[torch.nn.Module, dict, str]:
    obj, how = load_file(str(source))
    sd, key = pick_state_dict(obj, args.checkpoint_key, str(source))
    model, kwargs = build_timm(args.model, args.model_kwargs, str(source))
    meta = foreign_metadata(model, args.model, kwargs, args.input_size, args.mean, args.std)
    validate_metadata(meta, f"{source} with --model {args.model}")
    match = load_weights(model, sd, str(source), args.prefix)
    epoch = obj.get("epoch") if isinstance(obj, dict) else None
    meta.update(objective="foreign", step=int(epoch) if isinstance(epoch, int) else 0, epoch=None,
                run=None, source={"file": str(source), "read_with": how, "checkpoint_key": key,
                                  "prefix": match["prefix"]})
    return model, meta, unused_note(str(source), match, key)


def write_export(model: torch.nn.Module, meta: dict, out: Path) -> None:
    """Measure the feature size, then write through the format's own writer, checked by the
    evaluator's metadata reader before the file takes its name."""
    model.eval()
    if meta.get("pool") == "head":  # timm's pooled output, measured (robust to unusual heads)
        size, chans = meta["input_size"], int(meta["model_kwargs"].get("in_chans", 3))
        try:
            with torch.no_grad():
                meta["feature_dim"] = int(model(torch.zeros(1, chans, size, size)).shape[-1])
        except Exception as e:  # e.g. a ViT built for 224 given --input-size 96: timm asserts
            raise EvalError(f"{meta['model_name']} fails on a {size}x{size} input "
                            f"({' '.join(str(e).split())[:200]})") from None
    else:  # mean over patch tokens: the token width
        meta["feature_dim"] = int(model.num_features)
    fmt.write_export(model.state_dict(), meta, out, check=True)


def _read_file_at(source: Path, out: Path) -> Path | None:
    """The input file that ``out`` already is (the same file, through any link), or None: the
    SOURCE file itself, or any file of the training checkpoint SOURCE names."""
    if not out.exists():
        return None
    ckpt = source if not source.is_dir() or (source / fmt.TRAINER_FILE).is_file() else fmt.latest_checkpoint(source)
    inputs = [source] if not source.is_dir() else [f for f in (ckpt.rglob("*") if ckpt else []) if f.is_file()]
    if source.is_dir():
        inputs.append(source / "recipe.yaml")
    return next((f for f in inputs if f.exists() and os.path.samefile(f, out)), None)


def build_parser() -> argparse.ArgumentParser:
    from selfsup_eval.common import _json_object

    p = argparse.ArgumentParser(prog="selfsup-export", description="Write a backbone checkpoint (a selfsup "
                                "training checkpoint, or another framework's with --model) as a selfsup export.")
    p.add_argument("source", help="RUN_DIR, RUN_DIR/checkpoints/step-N, or a checkpoint file (with --model)")
    p.add_argument("out", help="the .safetensors export to write")
    p.add_argument("--model", metavar="TIMM_NAME", help="timm model of a foreign checkpoint")
    p.add_argument("--model-kwargs", type=_json_object, default=None, metavar="JSON")
    p.add_argument("--checkpoint-key", default=None, metavar="KEY")
    p.add_argument("--prefix", default=None)
    p.add_argument("--input-size", type=int, default=None, metavar="N")
    p.add_argument("--mean", type=float, nargs="+", default=None)
    p.add_argument("--std", type=float, nargs="+", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        source, out = Path(args.source), Path(args.out)
        if not source.exists():
            raise EvalError(f"not found: {source}")
        if (same := _read_file_at(source, out)) is not None:
            raise EvalError(f"{out} is {same}, which this command reads: writing it would destroy "
                            "the source; name another output file")
        if source.is_dir():
            model, meta, note = from_training_checkpoint(source)
        elif has_selfsup_metadata(source):
            raise EvalError(f"{source} is already a selfsup export")
        elif not args.model:
            raise EvalError(f"{source}: a checkpoint file of another framework needs --model TIMM_NAME")
        else:
            model, meta, note = from_foreign(source, args)
        write_export(model, meta, out)
        print(f"note: {note}")
        print(f"wrote {out} ({meta['model_name']}, input {meta['input_size']}, pool {meta['pool']}, "
              f"feature_dim {meta.get('feature_dim')})")
        return 0
    except (ValueError, OSError) as e:
        print(f"selfsup-export: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
