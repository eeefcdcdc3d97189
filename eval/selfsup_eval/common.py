"""What every ``selfsup-eval`` mode shares: reading a checkpoint of any kind, the checks on
shards that run before a long extraction, and the guard that turns bad input into one line.

The modes (``knn``/``linear``/``all`` in :mod:`selfsup_eval.cli`, ``embed`` in
:mod:`selfsup_eval.embeddings`, ``suite``) import these from here, below all of them, so no mode
module imports another.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from selfsup_eval.checkpoint import (RAW, EvalError, expand_checkpoints, has_selfsup_metadata, load_backbone,
                                     read_metadata, resolve_raw)
from selfsup_eval.budgets import raw_shape
from selfsup_eval.data import first_sample
from selfsup_eval.features import dist_info
from selfsup_eval.foreign import build_timm, load_foreign
from selfsup_eval.init_baseline import expand_baselines, load_init


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """How to read another framework's checkpoint (shared with ``selfsup-eval embed``)."""
    g = p.add_argument_group("checkpoints of other frameworks (a file without selfsup metadata)")
    g.add_argument("--model", metavar="TIMM_NAME", default=None,
                   help="timm model the file's backbone fits (plain/torchvision/timm state dicts, official "
                   "MoCo, DINO, I-JEPA, solo-learn, lightly layouts; docs/formats.md)")
    g.add_argument("--model-kwargs", type=_json_object, default=None, metavar="JSON",
                   help="timm.create_model keyword arguments, e.g. '{\"class_token\": false, \"global_pool\": \"avg\"}'")
    g.add_argument("--checkpoint-key", default=None, metavar="KEY",
                   help="the entry holding the state dict (default: detected, e.g. state_dict, teacher)")
    g.add_argument("--prefix", default=None, metavar="PREFIX",
                   help="name prefix of the backbone's weights (default: detected, e.g. module.encoder_q.)")
    g.add_argument("--input-size", type=int, default=None, metavar="N",
                   help="input side (default: timm's pretrained config of the model)")
    g.add_argument("--mean", type=float, nargs="+", default=None, help="normalisation mean (default: timm's)")
    g.add_argument("--std", type=float, nargs="+", default=None, help="normalisation std (default: timm's)")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r}")
    return value


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def resolve(spec: str, what: str):
    """Shards through the shared low-level package (selfsup_io), never the trainer's."""
    from selfsup_io.shards import ShardSpecError, resolve_shards

    prefer = {"train": ("train",), "val": ("val", "test")}.get(what, ())
    try:
        return resolve_shards(spec, prefer)
    except ShardSpecError as e:
        raise EvalError(f"--{what}: {one_line(e)}") from None


def check_labelled(shards, what: str) -> None:
    """Fail before a long extraction when the first sample already shows unlabelled shards."""
    s = first_sample(shards.urls)
    if s is not None and s.label is None and not s.bad_label:
        raise EvalError(f"--{what} {shards.spec}: sample {s.key} has no 'cls' label: k-NN and linear "
                        "probes need labelled shards (selfsup-shards with labels)")


def check_class_sets(train, val, ftrain: dict | None = None, fval: dict | None = None) -> None:
    """Index class names when both shard sets have them; then, once extracted, the labels actually
    seen: a val class that no train sample has cannot be predicted by any probe (the same class
    names with disjoint samples scored 0.00 % with exit 0, issue #16)."""
    names = None
    if train.class_names is not None and val.class_names is not None:
        if list(train.class_names) != list(val.class_names):
            raise EvalError(f"train and val shards have different class sets ({len(train.class_names)} vs "
                            f"{len(val.class_names)} classes in their index class_names): write both "
                            "splits from the same source")
        names = list(train.class_names)
    if ftrain is not None and fval is not None:
        unseen = sorted(set(fval["label"].tolist()) - set(ftrain["label"].tolist()))
        if unseen:
            n = int(torch.isin(fval["label"], torch.tensor(unseen)).sum())
            shown = [repr(names[u]) if names and u < len(names) else str(u) for u in unseen[:5]]
            raise EvalError(f"mismatched class sets: {n} of {len(fval['label'])} val samples have label(s) "
                            f"{', '.join(shown)}{' ...' if len(unseen) > 5 else ''} that no train sample has: "
                            "no probe can predict them (evaluate on splits that share their classes)")


def baseline_paths(args) -> list[str]:
    """``--baseline`` as checkpoint paths: ``init`` becomes the files the CHECKPOINT runs started
    from (:mod:`selfsup_eval.init_baseline`), remembered in ``args.init_specs`` so that
    :func:`check_checkpoint` and :func:`load_any` read them as the runs did."""
    baselines, args.init_specs = expand_baselines(args.baseline, args.checkpoints)
    return expand_checkpoints(baselines)


def check_checkpoint(path: str, args) -> None:
    """A selfsup export's metadata, or for any other file that ``--model`` says how to read it."""
    if path == RAW or path in getattr(args, "init_specs", {}):  # --baseline init: checked when expanded
        return
    if has_selfsup_metadata(path) or not args.model:
        read_metadata(path)  # the one-line error says what is missing
        return
    build_timm(args.model, args.model_kwargs, path)  # a wrong --model fails before any extraction


def load_any(path: str, args):
    """raw-pixels, a selfsup export, or (with ``--model``) another framework's checkpoint."""
    if path in getattr(args, "init_specs", {}):  # --baseline init: read as the run read it
        bb, note = load_init(path, args.init_specs[path])
        if dist_info()[0] == 0:
            print(f"note: init: {note}")
        return bb
    if path == RAW or has_selfsup_metadata(path):
        return load_backbone(path, args.raw_size)
    bb, note = load_foreign(path, args.model, args.model_kwargs, args.checkpoint_key, args.prefix,
                            args.input_size, args.mean, args.std)
    if dist_info()[0] == 0:
        print(f"note: {note}")
    return bb


def prepare_raw(bb, train) -> None:
    side, channels = raw_shape(train.urls)  # the median of a sample, capped (budgets.py)
    resolve_raw(bb, (side, side), channels)


def init_distributed(args) -> bool:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    if args.device.startswith("cuda"):
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return True


def guarded(args, work):
    """``work()`` under torchrun's set-up and tear-down; bad input (a
    :class:`~selfsup_io.errors.UserError`: EvalError, ShardSpecError...; ``OSError``: an unwritable
    --out) becomes one :class:`UsageError` whose message is the CLI's line."""
    from selfsup_io.errors import UsageError, UserError

    started, ok = init_distributed(args), False
    try:
        result = work()
        ok = True
        return result
    except UsageError:
        raise
    except (UserError, OSError) as e:  # not any ValueError: a bug in selfsup must show its traceback
        raise UsageError(f"selfsup-eval: error: {one_line(e)}") from None
    finally:
        if started:
            import torch.distributed as dist

            # after a success every rank waits for rank 0's writes, then all tear gloo down
            # together: a rank that left while its peer was still connected aborted at exit
            # ("terminate called without an active exception") in CI. Failures are collective
            # (features.py), so every rank skips the barrier together.
            if ok:
                dist.barrier()
            dist.destroy_process_group()


def run_guarded(args, work) -> int:
    """:func:`guarded` for a CLI: the error line on stderr and exit status 2."""
    from selfsup_io.errors import UsageError

    try:
        guarded(args, work)
        return 0
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
