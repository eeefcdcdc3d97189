"""``selfsup-eval suite SUITE.yaml CHECKPOINT... --out DIR``: a VTAB-1k-style transfer suite.

Every checkpoint is judged on every task of the suite file (:mod:`selfsup_eval.suite_file`) by
the VTAB-1k protocol: draws of ``n_train`` examples (:mod:`selfsup_eval.suite_data`), choices on
800 → 200, refit on 1,000, the whole test split scored (:mod:`selfsup_eval.suite` for the frozen
protocols, :mod:`selfsup_eval.finetune` for ``finetune``), then a paired bootstrap verdict of each
checkpoint against the reference (:mod:`selfsup_eval.verdict`). Checkpoints are expanded, checked
and loaded exactly as the other modes do it (:mod:`selfsup_eval.common`), so exports, run
directories, ``raw-pixels`` and other frameworks' files with ``--model`` all work; ``--baseline``
checkpoints are listed first and get every protocol too. Features go through the feature cache,
one extraction per (checkpoint, task draw) and (checkpoint, task test split).

Order of work: the suite file, every checkpoint and the reference are checked, and the draws
written, before the first extraction; any problem is one ``selfsup-eval: error:`` line, exit 2.
The suite runs in one process (rank 0's work only; no torchrun).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from selfsup_eval import suite_report
from selfsup_eval.checkpoint import RAW, EvalError, expand_checkpoints, has_selfsup_metadata, read_metadata, \
    run_dir_of, run_name
from selfsup_eval.suite import FROZEN, PROTOCOLS, aggregate, frozen, summarise
from selfsup_io.errors import UserError

MAIN_ORDER = ("finetune", "linear", "knn_linear", "knn")  # the verdict that heads the list


def build_parser() -> argparse.ArgumentParser:
    from selfsup_eval.common import add_model_arguments

    p = argparse.ArgumentParser(prog="selfsup-eval suite", description="VTAB-1k-style transfer suite: "
                                "every checkpoint on every task of SUITE.yaml, with a paired verdict "
                                "(docs/transfer-suite.md).")
    p.add_argument("suite", metavar="SUITE.yaml", help="the suite file (tasks: name, group, train, test)")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="export .safetensors, run directory (all its exports, by step), or raw-pixels")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="results.json, suite.csv, suite.png, keys/ (the draws) and subsets/")
    p.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(FROZEN), metavar="P",
                   help=f"of {', '.join(PROTOCOLS)} (default: {' '.join(FROZEN)}; finetune trains the backbone)")
    p.add_argument("--subsets", type=int, default=1, metavar="S",
                   help="draws of n_train examples per task (default 1, as VTAB); reported as mean ± std")
    p.add_argument("--reference", default=None, metavar="NAME",
                   help="checkpoint the verdicts compare with (name or path; init: the start --baseline "
                   "init names; default: the first)")
    p.add_argument("--baseline", action="append", default=[], metavar="CHECKPOINT",
                   help="a checkpoint listed first (e.g. raw-pixels; init: the weights the runs started "
                   "from, model.init; then the default reference); repeatable")
    f = p.add_argument_group("finetune protocol (docs/transfer-suite.md)")
    f.add_argument("--finetune-lr", type=float, nargs="+", default=[0.001, 0.01], metavar="LR",
                   help="learning rates tried on 800 → 200 (default 0.001 0.01, VTAB's)")
    f.add_argument("--finetune-steps", type=int, nargs="+", default=[500, 2500], metavar="N",
                   help="step counts tried on 800 → 200 (default 500 2500, VTAB's)")
    f.add_argument("--finetune-batch", type=int, default=64, metavar="B", help="batch size (default 64)")
    add_model_arguments(p)
    p.add_argument("--raw-size", type=int, default=None, metavar="N",
                   help="raw-pixels: resize + centre-crop to N (default: the task's input_size, else native)")
    p.add_argument("--cache-dir", default=None,
                   help="feature cache (default $SELFSUP_EVAL_CACHE or ~/.cache/selfsup-eval)")
    p.add_argument("--no-cache", action="store_true", help="extract without reading or writing the cache")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=None, help="image-decoding threads (default min(4, CPUs))")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def parse(argv):
    p = build_parser()
    args = p.parse_args(argv)
    args.protocols = [x for x in PROTOCOLS if x in args.protocols]
    if args.subsets < 1:
        p.error("--subsets must be at least 1")
    if args.batch_size < 1 or (args.raw_size is not None and args.raw_size < 1):
        p.error("--batch-size and --raw-size must be positive")
    if min(args.finetune_lr) <= 0 or min(args.finetune_steps) < 1 or args.finetune_batch < 1:
        p.error("--finetune-lr, --finetune-steps and --finetune-batch must be positive")
    return args


def cheap_name(path: str, args) -> str:
    """The name the record will carry, without loading weights (to check --reference early)."""
    if path == RAW:
        return RAW
    if path in getattr(args, "init_specs", {}):  # --baseline init (selfsup_eval.init_baseline)
        return f"init:{Path(path).name}"
    if has_selfsup_metadata(path):
        return f"{run_name(Path(path))}@{read_metadata(Path(path)).get('step', '?')}"
    return f"{Path(path).stem}[{args.model}]"


def pick_reference(args, entries: list[str], names: list[str]) -> int:
    if args.reference is None:
        return 0
    hits = [i for i, (p, n) in enumerate(zip(entries, names)) if args.reference in (p, n)]
    if not hits and args.reference in args.checkpoints + args.baseline:  # a run dir as given
        hits = [i for i, p in enumerate(entries) if os.path.dirname(os.path.dirname(p)) ==
                os.path.normpath(args.reference)][-1:]
    if len(hits) != 1:
        why = "matches none" if not hits else "matches several"
        raise EvalError(f"--reference {args.reference}: {why} of the checkpoints ({', '.join(names)})")
    return hits[0]


def _with_size(bb, task, args):
    """The backbone's transform for ``task``: its ``input_size`` if the suite sets one."""
    from selfsup_eval.common import prepare_raw

    if bb.is_raw:
        bb.meta["input_size"] = args.raw_size or task.input_size  # --raw-size wins: 224 px raw is 150k features
        prepare_raw(bb, task.train)
    elif task.input_size is not None and task.input_size != bb.meta.get("input_size"):
        from selfsup_eval.checkpoint import check_feature_dim

        bb.meta["input_size"] = task.input_size
        try:  # a ViT built for one size fails here in one line, not inside the extraction
            check_feature_dim(bb)
        except EvalError as e:
            raise EvalError(f"task {task.name}: input_size {task.input_size}: {e}") from None
    return bb


def evaluate(args):
    from selfsup_eval.common import baseline_paths, check_checkpoint, load_any
    from selfsup_eval.features import cached_features, default_cache_dir
    from selfsup_eval.suite_data import hold_indices, prepare_draws
    from selfsup_eval.suite_file import load_suite

    tasks = load_suite(args.suite)
    baselines = baseline_paths(args)  # --baseline init: the files the runs started from
    entries = baselines + expand_checkpoints(args.checkpoints)
    n_base = len(baselines)
    if args.reference == "init" and len(args.init_specs) == 1:  # the paired verdict against the start
        args.reference = next(iter(args.init_specs))
    for path in entries:
        check_checkpoint(path, args)
    names = [cheap_name(p, args) for p in entries]
    ref = pick_reference(args, entries, names)
    out = Path(args.out)
    draws = {t.name: prepare_draws(t, args.subsets, out) for t in tasks}
    cache = None if args.no_cache else (args.cache_dir or default_cache_dir())
    kw = dict(batch_size=args.batch_size, device=args.device, workers=args.workers)
    records, correct = [], []
    for ci, path in enumerate(entries):
        bb = load_any(path, args)
        size0 = bb.meta.get("input_size")
        rec = {"name": bb.name, "path": path, "run": run_dir_of(path), "baseline": ci < n_base,
               "step": bb.step, "objective": bb.meta.get("objective"), "feature_dim": bb.meta.get("feature_dim"),
               "suite": {"file": args.suite, "subsets": args.subsets, "protocols": args.protocols, "tasks": {}}}
        corr = {}
        for task in tasks:
            bb.meta["input_size"] = size0
            _with_size(bb, task, args)
            print(f"{bb.name}: task {task.name} ({task.group})", flush=True)
            ftest = cached_features(bb, task.test.urls, cache, desc=f"{bb.name} {task.name} test",
                                    total=task.test.num_samples, expected=task.test.shard_sizes, **kw)
            runs = {p: [] for p in args.protocols}
            corr[task.name] = {p: [] for p in args.protocols}
            n_train = []
            for d in draws[task.name]:
                ftrain = cached_features(bb, d.shards.urls, cache, desc=f"{bb.name} {task.name} draw {d.index}",
                                         total=d.shards.num_samples, expected=d.shards.shard_sizes, **kw)
                hold = hold_indices(ftrain["key"], d)
                n_train.append(len(ftrain["key"]))
                if len(hold) == 0 or len(hold) == len(ftrain["key"]):
                    raise EvalError(f"task {task.name}: draw {d.index} has no decodable images on one side of "
                                    "its train/val split")
                recs, cs = frozen(ftrain, ftest, hold, [p for p in args.protocols if p in FROZEN], args.device)
                cs = {p: (ftest["key"], c) for p, c in cs.items()}
                if "finetune" in args.protocols:
                    from selfsup_eval.finetune import finetune_protocol

                    recs["finetune"], tkeys, tcorrect = finetune_protocol(bb, d, task, args)
                    cs["finetune"] = (tkeys, tcorrect)
                for p in args.protocols:
                    runs[p].append(recs[p])
                    corr[task.name][p].append(cs[p])
            entry = {"group": task.group, "n_train": n_train[0] if len(set(n_train)) == 1 else n_train,
                     "n_test": len(ftest["key"])}
            entry.update({p: summarise(runs[p]) for p in args.protocols})
            entry["keys"] = [str(d.keys_file.relative_to(out)) for d in draws[task.name]]
            rec["suite"]["tasks"][task.name] = entry
        bb.model = None
        rec["suite"]["groups"], rec["suite"]["mean"] = aggregate(rec["suite"]["tasks"], args.protocols)
        records.append(rec)
        correct.append(corr)
    add_verdicts(records, correct, ref, args.protocols)
    return records


def _paired(a, b):
    """Correctness of the test images both runs scored, aligned by key."""
    (ka, ca), (kb, cb) = a, b
    if ka == kb:
        return ca, cb
    pos = {k: i for i, k in enumerate(kb)}
    both = [(i, pos[k]) for i, k in enumerate(ka) if k in pos]
    return ca[[i for i, _ in both]], cb[[j for _, j in both]]


def add_verdicts(records, correct, ref: int, protocols) -> None:
    from selfsup_eval.verdict import paired_stats, verdict

    for ci, rec in enumerate(records):
        if ci == ref:
            continue
        verdicts = {}
        for p in protocols:
            per_task = {}
            for t, by_p in correct[ci].items():
                per_task[t] = []
                for mine, theirs in zip(by_p[p], correct[ref][t][p]):
                    ca, cb = _paired(theirs, mine)
                    per_task[t].append(paired_stats(cb, ca))
            verdicts[p] = verdict(per_task, records[ref]["name"])
        main = next(p for p in MAIN_ORDER if p in verdicts)
        rec["verdict"] = {**verdicts[main], "protocol": main}
        rec["verdicts"] = verdicts


def main(argv: list[str] | None = None) -> int:
    from selfsup_eval.common import one_line

    try:
        args = parse(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print("selfsup-eval: error: suite runs in one process (not under torchrun / accelerate launch)",
              file=sys.stderr)
        return 2
    try:
        records = evaluate(args)
        protocol = (f"protocol: VTAB-1k per task: draws of n_train examples seeded from the task name; every "
                    f"choice on the draw's train part → its held-out part, refit on the whole draw, the whole "
                    f"test split scored; {args.subsets} draw(s) per task; fp32 on CPU, bf16 autocast on GPU")
        print(protocol)
        print(suite_report.tables(records, args.protocols, args.subsets))
        for line in suite_report.verdict_lines(records):
            print(line)
        main_p = next(p for p in MAIN_ORDER if p in args.protocols)
        suite_report.write(args.out, records, args.protocols, main_p)
        from selfsup_eval.html import write_report

        page = write_report(args.out, records, protocol)  # the tables and verdicts, suite.png
        print(f"results: {os.path.join(args.out, 'results.json')}, {page}")
        return 0
    except (UserError, OSError) as e:  # not any ValueError: a bug must show its traceback
        print(f"selfsup-eval: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
