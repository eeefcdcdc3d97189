"""Recipe sweep: train one recipe under several sets of overrides at once, score each export with
the k-NN probe on the full labelled split, print one table.

Used to choose ``make demo``'s settings on a GPU in minutes instead of CPU hours: the runs are
small (resnet10t at 28 px), so several share one GPU and each gets a slice of the CPUs for
decoding. Every variant is ``NAME:OVERRIDE OVERRIDE ...`` (``base:`` for none).

    python bench/sweep.py --recipe recipes/demo_fmnist.yaml --parallel 12 \\
        base: t0.1:objective.temperature=0.1 "scale:augment.scale=[0.2,1.0]" ...

One JSON line per finished run is appended to ``--out``: name, overrides, k-NN top-1 at k = 20 and
200 (T = 0.07), epochs trained, final loss, wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(name: str, overrides: list[str], args) -> dict:
    run_dir = ROOT / "runs" / "sweep" / name
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    train = [sys.executable, "-m", "selfsup.cli", args.recipe, *overrides, f"run.dir={run_dir}",
             "resume=none", "checkpoint.every_steps=0", f"data.num_workers={args.workers}"]
    knn = [sys.executable, "-m", "selfsup_eval", "knn", str(run_dir / "export" / "backbone.safetensors"),
           "--train", args.train, "--val", args.val, "--k", "20", "200", "--out", str(run_dir / "eval")]
    rec = {"name": name, "overrides": overrides}
    with open(ROOT / "runs" / "sweep" / f"{name}.log", "w") as log:
        for what, cmd in (("train_s", train), ("eval_s", knn)):
            t0 = time.perf_counter()
            rec["rc"] = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       timeout=args.timeout).returncode
            rec[what] = round(time.perf_counter() - t0, 1)
            if rec["rc"]:
                break
    if rec["rc"] == 0:
        res = json.loads((run_dir / "eval" / "results.json").read_text())[-1]
        last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        rec.update(knn20=res["knn"]["k=20"], knn200=res["knn"]["k=200"], epochs=last.get("epoch"),
                   final_loss=last.get("loss"))
    print(json.dumps(rec), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps({**rec, "recipe": args.recipe, "date": time.strftime("%Y-%m-%d")}) + "\n")
    return rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="+", help="NAME:OVERRIDE OVERRIDE ... (base: for none)")
    p.add_argument("--recipe", default="recipes/demo_fmnist.yaml")
    p.add_argument("--train", default="data/fashion-mnist/train.json")
    p.add_argument("--val", default="data/fashion-mnist/test.json")
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--workers", type=int, default=1, help="decode workers per run")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per training or evaluation")
    p.add_argument("--out", help="JSONL file the records are appended to")
    args = p.parse_args()
    (ROOT / "runs" / "sweep").mkdir(parents=True, exist_ok=True)
    jobs = [(v.split(":", 1)[0], v.split(":", 1)[1].split()) for v in args.variants]
    with ThreadPoolExecutor(args.parallel) as pool:
        recs = list(pool.map(lambda j: run(*j, args), jobs))
    print(f"\n{'variant':<14} {'k-NN@20':>8} {'k-NN@200':>9} {'train s':>8}  overrides")
    for r in recs:
        knn = f"{r['knn20'] * 100:8.2f} {r['knn200'] * 100:9.2f}" if "knn20" in r else f"{'failed':>8} {'':>9}"
        print(f"{r['name']:<14} {knn} {r['train_s']:8.1f}  {' '.join(r['overrides'])}")


if __name__ == "__main__":
    main()
