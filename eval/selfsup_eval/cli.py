"""``selfsup-eval {knn,linear,all} CHECKPOINT... --train SHARDS --val SHARDS``.

CHECKPOINT is an exported ``.safetensors`` file, a run directory (every
``export/backbone-step*.safetensors`` in it ordered by step, else ``export/backbone.safetensors``),
``raw-pixels`` (no network: the decoded pixels in [0, 1] are the features, at the median size
of the first 64 train images, at most 64, or ``--raw-size``) or, with ``--model TIMM_NAME``, another framework's checkpoint
(:mod:`selfsup_eval.foreign`). ``--baseline CHECKPOINT`` adds a reference evaluated by k-NN only
and listed first (``--baseline raw-pixels``). What runs on the features in which mode (k-NN,
linear, k-NN ⊕ linear, ``--shots``/``--fraction`` low-shot protocols) is :mod:`selfsup_eval.probes`.

Protocol (printed as one line with the table, as DINO's eval scripts do): frozen backbone in eval
mode; decode, resize the shorter side to the checkpoint's input size and centre-crop it (exact
no-op at that size), [0, 1], the checkpoint's mean/std, its pooling; bf16 autocast on GPU, fp32
on CPU; features extracted once per (checkpoint, shards, transform) and cached, so ``all``, a
second k or a rerun cost no extraction. k-NN: :mod:`selfsup_io.knn`; linear probe:
:mod:`selfsup_eval.linear` (the cached-feature protocol, no augmentation).

Runs under ``torchrun`` / ``accelerate launch``: extraction is split across processes and
gathered; only rank 0 computes the probes, prints and writes. Bad input exits with status 2 and
one ``selfsup-eval: error: ...`` line, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from selfsup_eval import report
from selfsup_eval.checkpoint import MAX_INPUT_SIZE, EvalError, expand_checkpoints, run_dir_of
from selfsup_eval.common import (add_model_arguments, baseline_paths, check_checkpoint, check_class_sets,
                                 check_labelled, load_any, prepare_raw, resolve, run_guarded)
from selfsup_eval.features import cached_features, default_cache_dir, dist_info
from selfsup_eval.probes import probe
from selfsup_eval.sample_checks import DEFAULT_MAX_CORRUPT_FRACTION, check_corrupt_fraction

PROTOCOL = ("protocol: frozen backbone in eval mode | resize shorter side + centre-crop to the "
            "checkpoint's input_size, [0,1], its mean/std, its pooling; {precision} | k-NN: cosine "
            "on L2-normalised features, k nearest vote exp(s/T), T={temperature} | linear: cached "
            "features, no augmentation (the cached-feature protocol, not the papers' 90-epoch "
            "augmented probe), L-BFGS logistic regression on standardised features, weight decay "
            "chosen on a seeded 10% hold-out of train, refit on all of train | k-NN ⊕ linear: "
            "lambda*p_kNN + (1-lambda)*p_linear, lambda, k, T chosen on the same hold-out (Jia et al. 2021)")


DEFAULT_KS = (10, 20, 100, 200)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfsup-eval", description="k-NN and linear probes of "
                                "exported selfsup backbones on labelled WebDataset shards ("
                                "'selfsup-eval embed --help': write every sample's embedding; "
                                "'selfsup-eval suite --help': a VTAB-style transfer suite).")
    p.add_argument("mode", choices=("knn", "linear", "all"), help="all: both, from one extraction")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="export .safetensors, run directory (all its exports, by step), or raw-pixels")
    p.add_argument("--train", required=True, metavar="SHARDS", help="labelled train shards (docs/formats.md)")
    p.add_argument("--val", required=True, metavar="SHARDS", help="labelled val shards")
    p.add_argument("--k", type=int, nargs="+", default=None,
                   help=f"k-NN sweep, one pass (default {' '.join(map(str, DEFAULT_KS))}, those "
                   "up to the train set size)")
    p.add_argument("--temperature", type=float, default=0.07, help="k-NN vote weight exp(s/T)")
    p.add_argument("--knn-loss", type=float, default=0.0, metavar="COEFF",
                   help="train the linear probe with the k-NN easy/hard weighting of Jia et al. 2021 "
                   "(loss x (1 + COEFF x -log p_kNN(y)); their scripts use 0.01; default 0: off)")
    p.add_argument("--shots", type=int, nargs="+", default=None, metavar="N",
                   help="low-shot: N labelled train images per class (e.g. 1 10 100)")
    p.add_argument("--fraction", type=float, nargs="+", default=None, metavar="F",
                   help="low-shot: a class-stratified share F of the train split (e.g. 0.01 0.1)")
    p.add_argument("--subset-file", nargs="+", default=None, metavar="FILE",
                   help="low-shot on a fixed list (one sample key or source file name per line), e.g. the "
                   "published ImageNet 1%%/10%% lists; --fraction figures do not compare with those")
    p.add_argument("--subsets", type=int, default=5, metavar="N",
                   help="random subsets per low-shot protocol, seeded from the labels (default 5)")
    p.add_argument("--baseline", action="append", default=[], metavar="CHECKPOINT",
                   help="reference evaluated by k-NN only and listed first (e.g. raw-pixels; init: the "
                   "weights the runs started from, model.init); repeatable")
    add_model_arguments(p)
    p.add_argument("--raw-size", type=int, default=None, metavar="N",
                   help="raw-pixels: resize + centre-crop to N (default: the median shorter side of "
                   "the first 64 train images, at most 64; N at most 2048)")
    p.add_argument("--max-corrupt-fraction", type=float, default=DEFAULT_MAX_CORRUPT_FRACTION, metavar="F",
                   help="more unreadable samples than this fraction of a split is an error (default "
                   f"{DEFAULT_MAX_CORRUPT_FRACTION}; selfsup_eval.sample_checks)")
    p.add_argument("--out", metavar="DIR", help="write results.json, results.csv, accuracy_vs_step.png, "
                   "report.html and (mode all) the last checkpoint's pictures (docs/inspect.md)")
    p.add_argument("--no-pictures", action="store_true",
                   help="all: skip neighbours/map/confusion/curves.png (neighbours.png reads its images "
                   "back from the shards)")
    p.add_argument("--trackers", nargs="+", default=[], metavar="NAME",
                   help="also log the results to these trackers (accelerate's names: tensorboard, "
                        "wandb, mlflow...), one tracker run per call; needs --out (their local files)")
    p.add_argument("--project", default="selfsup", help="the trackers' project / experiment name")
    p.add_argument("--cache-dir", default=None,
                   help="feature cache (default $SELFSUP_EVAL_CACHE or ~/.cache/selfsup-eval)")
    p.add_argument("--no-cache", action="store_true", help="extract without reading or writing the cache")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=None, help="image-decoding threads (default min(4, CPUs))")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def parse(argv, parser: argparse.ArgumentParser | None = None):
    p = parser or build_parser()
    return check(p.parse_args(argv), p.error)


def check(args, error):
    """The checks argparse cannot do; ``error(message)`` does not return (``p.error`` exits, the
    Python API's raises :class:`~selfsup_io.errors.UsageError`)."""
    args.explicit_k = args.k is not None
    args.k = list(args.k or DEFAULT_KS)
    if min(args.k) < 1:
        error("--k values must be at least 1")
    if args.temperature <= 0:
        error("--temperature must be positive")
    if args.batch_size < 1 or (args.raw_size is not None and args.raw_size < 1):
        error("--batch-size and --raw-size must be positive")
    if args.raw_size is not None and args.raw_size > MAX_INPUT_SIZE:
        error(f"--raw-size must be at most {MAX_INPUT_SIZE}")
    if args.shots and min(args.shots) < 1:
        error("--shots values must be at least 1")
    if args.fraction and not all(0 < f <= 1 for f in args.fraction):
        error("--fraction values must be in (0, 1]")
    for f in getattr(args, "subset_file", None) or []:  # the Python API may not set it
        from selfsup_eval.lowshot import read_subset_file

        try:  # unreadable or empty: one line before any extraction
            read_subset_file(f)
        except EvalError as e:
            error(str(e))
    if args.input_size is not None and args.input_size < 1:
        error("--input-size must be positive")
    if args.subsets < 1:
        error("--subsets must be at least 1")
    if not 0 <= args.max_corrupt_fraction <= 1:
        error("--max-corrupt-fraction must be in [0, 1]")
    if not args.knn_loss >= 0:
        error("--knn-loss must be 0 (off) or positive")
    if args.trackers:
        if not args.out:
            error("--trackers needs --out: the trackers keep their local files there")
        from selfsup_io.tracking import TrackerError, check_trackers

        try:  # before any extraction: a missing package is one line at once
            args.trackers = check_trackers(args.trackers, "--trackers")
        except TrackerError as e:
            error(str(e))
    return args


def check_k(args, n_train: int) -> None:
    """An explicit k above the train size is an error; the default sweep just stops there."""
    if max(args.k) <= n_train:
        return
    if args.explicit_k or min(args.k) > n_train:
        raise EvalError(f"--k {max(args.k)} is larger than the train set ({n_train} samples)")
    args.k = [k for k in args.k if k <= n_train]


def evaluate(args) -> list[dict]:
    rank, world = dist_info()
    train, val = resolve(args.train, "train"), resolve(args.val, "val")
    args.train_urls = train.urls  # --subset-file: source file names are read from the train shards
    check_class_sets(train, val)
    check_labelled(train, "train")
    check_labelled(val, "val")
    entries = [(p, True) for p in baseline_paths(args)]
    entries += [(p, False) for p in expand_checkpoints(args.checkpoints)]
    for path, _ in entries:  # every export checked before the first (long) extraction
        check_checkpoint(path, args)
    if train.num_samples is not None:
        check_k(args, train.num_samples)
    cache = None if args.no_cache else (args.cache_dir or default_cache_dir())
    kw = dict(batch_size=args.batch_size, device=args.device, workers=args.workers,
              class_names=train.class_names or val.class_names)  # labels beyond them: bad labels
    records = []
    for path, baseline in entries:
        bb = load_any(path, args)
        if bb.is_raw:
            prepare_raw(bb, train)
        ftrain = cached_features(bb, train.urls, cache, desc=f"{bb.name} train", total=train.num_samples,
                                 expected=train.shard_sizes, **kw)
        fval = cached_features(bb, val.urls, cache, desc=f"{bb.name} val", total=val.num_samples,
                               expected=val.shard_sizes, **kw)
        bb.model = None  # free the weights before the next checkpoint
        for feats, split in ((ftrain, "train"), (fval, "val")):
            check_corrupt_fraction(feats, split, args.max_corrupt_fraction, bb.name)
        n_train, n_val = len(ftrain["label"]), len(fval["label"])
        if n_train == 0 or n_val == 0:
            raise EvalError(f"no decodable labelled samples in the {'train' if n_train == 0 else 'val'} shards")
        check_class_sets(train, val, ftrain, fval)
        check_k(args, n_train)
        record = {"name": bb.name, "path": path, "run": run_dir_of(path), "baseline": baseline,
                  "step": bb.step, "objective": bb.meta.get("objective"),
                  "feature_dim": bb.meta.get("feature_dim"), "train_samples": n_train,
                  "val_samples": n_val, "corrupt_samples": ftrain["corrupt"] + fval["corrupt"],
                  "corrupt_keys": (ftrain["corrupt_keys"] + fval["corrupt_keys"])[:5]}
        if rank == 0:
            want = (args.mode == "all" and args.out and not getattr(args, "no_pictures", False)
                    and not baseline and path == entries[-1][0])  # the last checkpoint's pictures
            extras = {} if want else None
            probe(args, record, ftrain, fval, baseline, extras)
            if want:
                from selfsup_eval.pictures import draw

                args.pictures = draw(args.out, bb.name, ftrain, fval, train, val,
                                     extras.get("linear_pred"), record["run"])
        records.append(record)
    return records


def run(args) -> list[dict]:
    """The command after parsing: evaluate, then (rank 0) print and write. The Python API
    (:mod:`selfsup_eval.api`) calls this too, so the two cannot drift."""
    records = evaluate(args)
    if dist_info()[0] == 0:
        precision = "bf16 autocast (GPU)" if args.device.startswith("cuda") else "fp32 (CPU)"
        counts = sorted({(r["train_samples"], r["val_samples"]) for r in records})
        protocol = (PROTOCOL.format(precision=precision, temperature=args.temperature) + " | samples: " +
                    ("; ".join(f"train {t}, val {v}" for t, v in counts) if len(counts) < 3 else
                     "per checkpoint in results.json"))
        print(protocol)
        print(report.table(records))
        low = report.lowshot_table(records)
        if low:
            print(f"low-shot: mean ± std over {args.subsets} subset(s) seeded from the train labels")
            print(low)
        for r in records:
            if r["corrupt_samples"]:
                print(f"note: {r['name']}: skipped {r['corrupt_samples']} corrupt sample(s), e.g. "
                      f"{', '.join(r['corrupt_keys'])}")
        if args.out:
            written = report.write(args.out, records)
            from selfsup_eval.html import write_report

            page = write_report(args.out, records, protocol,
                                extra_pictures=[p.name for p in written if p.suffix == ".png"]
                                + getattr(args, "pictures", []))
            print(f"results: {os.path.join(args.out, 'results.json')}, {page}")
        if args.trackers:
            report.to_trackers(records, args)
    return records


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["embed"]:  # its own arguments (selfsup_eval.embeddings)
        from selfsup_eval.embeddings import main as embed_main

        return embed_main(argv[1:])
    if argv[:1] == ["suite"]:  # its own arguments (selfsup_eval.suite_cli, docs/transfer-suite.md)
        from selfsup_eval.suite_cli import main as suite_main

        return suite_main(argv[1:])
    try:
        args = parse(argv)
    except SystemExit as e:  # argparse: usage + one error line, status 2
        return int(e.code or 0)
    return run_guarded(args, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
