"""``selfsup-eval {knn,linear,all} CHECKPOINT... --train SHARDS --val SHARDS``.

CHECKPOINT: an exported ``.safetensors``, a run directory (all its exports, by step), or
``raw-pixels`` (the checkpoint-free baseline: the pixels themselves are the features). Features are
extracted once per checkpoint and cached, so ``all`` and reruns cost one extraction.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from selfsup_eval.checkpoint import RAW, EvalError, expand_checkpoints, load_backbone
from selfsup_eval.features import cached_features, dist_info
from selfsup_eval.knn import knn_classify, topk_accuracy
from selfsup_eval.linear import linear_probe
from selfsup_eval import report

PROTOCOL = ("protocol: frozen backbone in eval mode, resize+centre-crop to the checkpoint's input "
            "size, its mean/std and pooling; k-NN = cosine, exp(s/T) votes (DINO); linear = "
            "cached features, no augmentation, L-BFGS logistic regression, wd chosen on 10% of train")


def parse(argv):
    p = argparse.ArgumentParser(prog="selfsup-eval", description="k-NN and linear probes of exported backbones.")
    p.add_argument("mode", choices=("knn", "linear", "all"))
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="export .safetensors, run directory, or raw-pixels")
    p.add_argument("--train", required=True, help="labelled train shards (see docs/formats.md)")
    p.add_argument("--val", required=True, help="labelled val shards")
    p.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200])
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--baseline", action="append", default=[], metavar="CHECKPOINT",
                   help="evaluated by k-NN only and listed first (e.g. raw-pixels); repeatable")
    p.add_argument("--out", help="directory for results.json, results.csv, accuracy_vs_step.png")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--raw-size", type=int, default=None, help="resize raw-pixels inputs to this side")
    p.add_argument("--cache-dir", default=os.environ.get("SELFSUP_EVAL_CACHE",
                                                         os.path.expanduser("~/.cache/selfsup-eval")))
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p, p.parse_args(argv)


def shard_urls(spec: str, what: str):
    from selfsup.shards import ShardSpecError, resolve_shards

    try:
        return resolve_shards(spec, ("train",) if what == "train" else ("val", "test"))
    except ShardSpecError as e:
        raise EvalError(f"--{what}: {e}") from None


def evaluate(args) -> list[dict]:
    rank, _ = dist_info()
    train, val = shard_urls(args.train, "train"), shard_urls(args.val, "val")
    if train.class_names and val.class_names and train.class_names != val.class_names:
        raise EvalError(f"train and val shards have different class sets ({len(train.class_names)} "
                        f"vs {len(val.class_names)} classes): write both splits from the same source")
    cache = None if args.no_cache else args.cache_dir
    records = []
    baselines = expand_checkpoints(args.baseline)
    for path in baselines + expand_checkpoints(args.checkpoints):
        bb = load_backbone(path, args.raw_size)
        kw = dict(batch_size=args.batch_size, device=args.device)
        ftrain = cached_features(bb, train.urls, cache, desc=f"{bb.name} train", **kw)
        fval = cached_features(bb, val.urls, cache, desc=f"{bb.name} val", **kw)
        if len(ftrain["label"]) == 0 or len(fval["label"]) == 0:
            raise EvalError("no decodable samples in the train or val shards")
        unseen = set(fval["label"].tolist()) - set(ftrain["label"].tolist())
        if unseen:
            raise EvalError(f"val has classes absent from train ({sorted(unseen)[:5]}): mismatched class sets")
        record = {"name": bb.name, "path": bb.path, "step": bb.step,
                  "objective": bb.meta.get("objective"), "train_samples": len(ftrain["label"]),
                  "val_samples": len(fval["label"]),
                  "corrupt_samples": ftrain["corrupt"] + fval["corrupt"]}
        if args.mode in ("knn", "all"):
            if max(args.k) > len(ftrain["label"]):
                raise EvalError(f"--k {max(args.k)} is larger than the train set ({len(ftrain['label'])} samples)")
            dev = args.device
            ranked = knn_classify(ftrain["features"].to(dev), ftrain["label"], fval["features"].to(dev),
                                  ks=args.k, temperature=args.temperature)
            record["knn"] = {f"k={k}": topk_accuracy(r, fval["label"], 1) for k, r in ranked.items()}
            record["knn_top5"] = {f"k={k}": topk_accuracy(r, fval["label"], 5) for k, r in ranked.items()}
            record["knn_temperature"] = args.temperature
        if args.mode in ("linear", "all") and rank == 0 and path not in baselines:
            record["linear"] = linear_probe(ftrain["features"], ftrain["label"], fval["features"],
                                            fval["label"], device=args.device)
        records.append(record)
    return records


def main(argv: list[str] | None = None) -> int:
    parser, args = parse(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    try:
        records = evaluate(args)
    except (EvalError, ValueError) as e:
        print(f"selfsup-eval: error: {e}", file=sys.stderr)
        return 2
    if dist_info()[0] == 0:
        print(PROTOCOL)
        print(report.table(records))
        if args.out:
            report.write(args.out, records)
            print(f"results: {args.out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
