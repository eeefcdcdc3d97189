"""Every objective on Fashion-MNIST at one image budget, several seeds: k-NN and linear top-1 of the
exported backbone, wall time, next to the raw-pixel baseline (issue: evidence).

Each run is the shipped recipe of the objective, put on Fashion-MNIST (``recipes/data/fashion_mnist.yaml``)
and on the same small backbone and optimiser as ``make demo`` (timm resnet10t at 28 px, AdamW
2e-3 per 256 images), trained for ``--images`` images (``train.max_steps = images / batch``), then
``selfsup-eval all --k 20`` (T = 0.07, linear probe on cached features) with 20k train and 5k
test images (``--eval-train/--eval-val`` for others). I-JEPA needs a ViT and
JigClu a feature map that splits into 2x2 tiles, so those two keep their small recipes' backbones
(`recipes/ijepa_vit_tiny.yaml`, `recipes/jigclu_small.yaml`) — the table says so.

    python bench/methods.py [--images 60000] [--seeds 0 1 2] [--batch-size 256]
        [--objectives infonce dcl dclw moco mochi infonce_halluc ijepa jigclu ...] [--out bench/results/methods]
        [--parallel 1] [--precision fp32]

On one GPU: ``python bench/methods.py --images 30000 --parallel 12 --precision bf16 --out
bench/results/methods-gpu`` (the runs are small; 12 share the GPU and the CPU cores decode).

Method fidelity (issue 15), each pair at the 4x budget of bench/RESULTS.md, 3 seeds, into a fresh
directory (runs.jsonl there holds no pre-#15 rows under the same names):

    python bench/methods.py --images 120000 --seeds 0 1 2 --out bench/results/methods-fidelity-4x \
        --parallel 2 --objectives ijepa moco moco_plainbn moco_halluc moco_halluc_twice infonce_halluc \
                     infonce_halluc_masked mochi ijepa_context

* shuffle/split-BN: ``moco`` (on, moco.yaml) vs ``moco_plainbn`` (off: one BN group, no shuffle);
* the Hallucinator on MoCo (the paper's headline setting): ``moco_halluc_twice`` (published: the
  authors' queue of duplicated keys) and ``moco_halluc`` (each key enqueued once) vs ``moco``;
* the Hallucinator on SimCLR: ``infonce_halluc`` (published NT-Xent) vs ``infonce_halluc_masked``;
* I-JEPA's export: ``ijepa`` (target/EMA encoder) vs ``ijepa_context`` (the context encoder of the
  same run: ijepa's final checkpoint resumed with ``objective.export=context``);
* MoCHi: ``mochi`` (mixing after the queue has filled) vs ``mochi_early`` (before) and ``moco``;
* I-JEPA's init: ``ijepa_fan_in`` (patch conv at the paper's output scale) and ``ijepa_rescale``
  (the √(2ℓ) rescaling) vs ``ijepa``.
On a GPU, the method table at ten times that budget: ``python bench/methods.py --images 1200000
--parallel 8 --precision bf16 --out bench/results/methods-gpu-10x``.

Every row runs the trainer's lr schedule (warm-up, then the cosine from the peak); the tables in
RESULTS.md dated before 2026-12-07 ran one cosine over the whole run (a tie over 3 seeds with the
official shape, measured there), so a fresh --out starts a new table rather than extending them.
Run directories go to runs/bench-methods/. Results: one JSON line per run appended to OUT/runs.jsonl (reruns skip what is there), and a
markdown table (mean ± half-range over seeds) printed and written to OUT/table.md, followed by the
per-seed differences of the compared pairs that ran (``PAIRS``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from statistics import mean

import torch

ROOT = Path(__file__).resolve().parents[1]
# the CLIs as modules of this interpreter: works in a venv and on a machine with only PYTHONPATH set
TRAIN_CMD, EVAL_CMD = [sys.executable, "-m", "selfsup.cli"], [sys.executable, "-m", "selfsup_eval"]
DEVICE = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
DATA = ["recipes/data/fashion_mnist.yaml"]
# probes on 20k train / 5k test images (4 + 1 shards of 5000): a full 70k extraction per run costs
# minutes on a CPU (4 for the ViT); the raw-pixel baseline uses the same subset
TRAIN, VAL = "data/fashion-mnist/train-{000000..000003}.tar", "data/fashion-mnist/test-000000.tar"

# the make-demo backbone and optimiser, shared by every contrastive run
RESNET = ["model.name=resnet10t", "model.small_stem=false", "model.channels_last=false",
          "model.zero_init_last=null",  # timm's init, as the demo (moco.yaml: torchvision's)
          "augment.size=28", "augment.scale=[0.5,1.0]",
          "optim.name=adamw", "optim.lr=2e-3", "optim.weight_decay=1e-4", "optim.momentum=0.9",
          "optim.decay_bias_and_norm=false",  # as the demo: moco.yaml's official SGD decays all
          "optim.warmup_epochs=0.1", "optim.lr_scaling=linear"]
HEAD = ["objective.temperature=0.2", "objective.proj_hidden_dim=512", "objective.proj_dim=128"]
# MoCo at this scale: a 4096-key queue (16 steps of 256), momentum 0.99; MoCHi(256, 128, 64).
# moco.yaml's shuffle-BN with 8 BatchNorm groups (8 x 32 at batch 256) is on unless a row says so.
MOCO = ["objective.queue_size=4096", "objective.momentum=0.99"]
MOCHI = ["objective.mochi.n=256", "objective.mochi.s=128", "objective.mochi.s_prime=64"]
HALLUC = ["objective.hallucinator.enabled=true", "objective.hallucinator.hidden_dim=256"]

OBJECTIVES = {
    "infonce": (["recipes/simclr.yaml"], RESNET + HEAD),
    "dcl": (["recipes/dcl.yaml"], RESNET + HEAD),
    "dclw": (["recipes/dclw.yaml"], RESNET + HEAD),
    "moco": (["recipes/moco.yaml"], RESNET + HEAD + MOCO),
    # mixing from epoch 0.1 (step 23 of 234 a Fashion-MNIST epoch), after the queue has filled
    # (step 16); mochi_early is the earlier setting (step 12), which the objective warns about
    "mochi": (["recipes/mochi.yaml"], RESNET + HEAD + MOCO + MOCHI + ["objective.mochi.start_epoch=0.1"]),
    "infonce_halluc": (["recipes/simclr.yaml"], RESNET + HEAD + HALLUC),  # the published NT-Xent
    "ijepa": (["recipes/ijepa_vit_tiny.yaml"], []),  # exports the target (EMA) encoder
    "jigclu": (["recipes/jigclu_small.yaml"], []),
    # issue 15's comparisons (the pairs are listed in the module docstring)
    "moco_plainbn": (["recipes/moco.yaml"], RESNET + HEAD + MOCO + [
        "objective.shuffle_bn=false", "objective.bn_splits=1"]),  # selfsup's MoCo before #15
    # keys enqueued once (selfsup's variant, the default until 2026-12-02) / [k; k] (published)
    "moco_halluc": (["recipes/moco_hallucinator.yaml"], RESNET + HEAD + MOCO + HALLUC + [
        "objective.hallucinator.enqueue_twice=false"]),
    "moco_halluc_twice": (["recipes/moco_hallucinator.yaml"], RESNET + HEAD + MOCO + HALLUC + [
        "objective.hallucinator.enqueue_twice=true"]),
    "infonce_halluc_masked": (["recipes/simclr.yaml"], RESNET + HEAD + HALLUC + [
        "objective.hallucinator.mask_same_image=true"]),  # infonce_halluc's rows before #15
    "mochi_early": (["recipes/mochi.yaml"], RESNET + HEAD + MOCO + MOCHI + ["objective.mochi.start_epoch=0.05"]),
    # I-JEPA init ablations (RESULTS.md: what is behind I-JEPA's drop since the pre-#15 rows)
    "ijepa_rescale": (["recipes/ijepa_vit_tiny.yaml"], ["objective.rescale_init=true"]),
    "ijepa_fan_in": (["recipes/ijepa_vit_tiny.yaml"], ["objective.patch_embed_init=fan_in"]),
}
# rows that evaluate another export of a row's training: that run's directory is copied and its
# final checkpoint resumed with the overrides (--accept-changes), so the two rows differ in nothing
# but what is exported -- and the training is paid for once
DERIVED = {"ijepa_context": ("ijepa", ["objective.export=context"])}
# the default run: the method table; the other rows are run by name (--objectives)
DEFAULT = ["infonce", "dcl", "dclw", "moco", "mochi", "infonce_halluc", "ijepa", "jigclu"]
# recipes that merge the data recipe under their own augmentation and keep their own backbone
OWN_BACKBONE = {"recipes/ijepa_vit_tiny.yaml": "ViT (6x192, patch 4, 32 px)",
                "recipes/jigclu_small.yaml": "resnet10t, 64 px montages"}


def backbone(name: str) -> str:
    """The backbone a row trains: its recipe's own, else the make-demo resnet10t."""
    source = DERIVED.get(name, (name,))[0]
    return OWN_BACKBONE.get(OBJECTIVES[source][0][0], "resnet10t 28 px")


def run_one(name: str, seed: int, images: int, batch: int, train: str, val: str, precision: str) -> dict:
    source, extra = DERIVED.get(name, (name, []))
    recipes, overrides = OBJECTIVES[source]
    overrides = [*overrides, *extra]
    run_dir = ROOT / "runs" / "bench-methods" / f"{name}-b{batch}-s{seed}"
    steps = max(1, images // batch)
    data = [] if recipes[0] in OWN_BACKBONE else DATA
    derived = source != name
    args = [*recipes, *data, *overrides, f"run.dir={run_dir}", f"run.seed={seed}",
            f"train.batch_size={batch}", f"train.max_steps={steps}", f"train.precision={precision}",
            "checkpoint.every_steps=0", "checkpoint.keep=1", "train.log_every=20",
            *(["resume=auto", "--accept-changes"] if derived else ["resume=none"])]
    if derived:  # the source run's final checkpoint, re-exported
        trained = ROOT / "runs" / "bench-methods" / f"{source}-b{batch}-s{seed}"
        if not (trained / "export" / "backbone.safetensors").is_file():
            raise SystemExit(f"bench/methods.py: {name} re-exports {source}'s run; run {source} "
                             f"(seed {seed}, batch {batch}) first")
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(trained, run_dir, ignore=shutil.ignore_patterns(".lock"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    subprocess.run([*TRAIN_CMD, *args], check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([*EVAL_CMD, "all", str(run_dir / "export" / "backbone.safetensors"),
                    "--train", train, "--val", val, "--k", "20", "--temperature", "0.07",
                    "--out", str(run_dir / "eval")], check=True, cwd=ROOT, env=env,
                   stdout=subprocess.DEVNULL)
    eval_s = time.perf_counter() - t0
    rec = json.loads((run_dir / "eval" / "results.json").read_text())[-1]
    loss = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    note = {"note": f"{source}'s training (the same run), {' '.join(extra)} exported; "
                    "train time: the re-export"} if derived else {}
    return {**note, "objective": name, "seed": seed, "batch": batch, "images": steps * batch,
            "knn20": rec["knn"]["k=20"], "linear": rec["linear"]["top1"], "train_s": round(train_s, 1),
            "eval_s": round(eval_s, 1), "final_loss": loss[-1], "cpu_threads": os.cpu_count(),
            "precision": precision, "device": DEVICE, "date": time.strftime("%Y-%m-%d")}


def raw_pixels(out: Path, train: str, val: str, compute: bool = True) -> dict | None:
    """The raw-pixel probes' row, cached in out; with compute=False only a cached row (or None)."""
    path = out / "raw-pixels.json"
    if not path.exists():
        if not compute:
            return None
        subprocess.run([*EVAL_CMD, "all", "raw-pixels", "--train", train, "--val", val,
                        "--k", "20", "--out", str(ROOT / "runs" / "bench-methods" / "raw-eval")],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        rec = json.loads((ROOT / "runs" / "bench-methods" / "raw-eval" / "results.json").read_text())[-1]
        path.write_text(json.dumps({"knn20": rec["knn"]["k=20"], "linear": rec["linear"]["top1"]}))
    return json.loads(path.read_text())


def fmt(values: list[float], scale: float = 100.0) -> str:
    if len(values) == 1:
        return f"{values[0] * scale:.2f}"
    return f"{mean(values) * scale:.2f} ± {(max(values) - min(values)) * scale / 2:.2f}"


def table(records: list[dict], raw: dict | None) -> str:
    lines = ["| objective | batch | backbone | seeds | images | k-NN@20 top-1 | linear top-1 | train time |",
             "|---|---|---|---|---|---|---|---|"]
    if raw:
        lines.append(f"| raw pixels | – | – | – | – | {raw['knn20'] * 100:.2f} | {raw['linear'] * 100:.2f} | – |")
    groups: dict = {}
    for r in records:
        groups.setdefault((r["objective"], r["batch"]), []).append(r)
    for (name, batch), rs in groups.items():
        mark = " †" if any("note" in r for r in rs) else ""
        lines.append(f"| {name}{mark} | {batch} | {backbone(name)} | {len(rs)} | "
                     f"{rs[0]['images']} | {fmt([r['knn20'] for r in rs])} | {fmt([r['linear'] for r in rs])} | "
                     f"{fmt([r['train_s'] / 60 for r in rs], 1)} min |")
    notes = sorted({r["note"] for r in records if "note" in r})
    return "\n".join(lines + [f"\n† {n}" for n in notes])


# issue 15's comparisons: (A, B, what A - B measures), paired by seed (the same data order)
PAIRS = [("moco", "moco_plainbn", "shuffle/split-BN on MoCo (moco.yaml: 8 groups)"),
         ("moco_halluc_twice", "moco", "the Hallucinator on MoCo as published (queue of [k; k])"),
         ("moco_halluc", "moco", "the Hallucinator on MoCo, each key enqueued once"),
         ("moco_halluc_twice", "moco_halluc", "the authors' queue of duplicated keys minus keys once"),
         ("infonce_halluc", "infonce_halluc_masked", "the Hallucinator on SimCLR: published minus masked loss"),
         ("ijepa", "ijepa_context", "I-JEPA: target (EMA) minus context encoder exported"),
         ("mochi", "moco", "MoCHi, mixing after the queue has filled, over MoCo"),
         ("mochi", "mochi_early", "MoCHi: mixing after minus before the queue has filled"),
         ("ijepa_fan_in", "ijepa", "I-JEPA: patch conv at the paper's output scale minus σ 0.02"),
         ("ijepa_rescale", "ijepa", "I-JEPA: with minus without the √(2ℓ) rescaling")]


def pairs_table(records: list[dict]) -> str:
    """Per-seed differences A - B (points) of the PAIRS both sides of which ran with a seed."""
    by = {(r["objective"], r["seed"], r["batch"], r["images"]): r for r in records}
    lines = ["| A − B | what it measures | seeds | k-NN@20, per seed | mean | linear, per seed | mean |",
             "|---|---|---|---|---|---|---|"]
    for a, b, what in PAIRS:
        both = sorted((k[1], by[k], by[(b, *k[1:])]) for k in by if k[0] == a and (b, *k[1:]) in by)
        if not both:
            continue
        cells = []
        for key in ("knn20", "linear"):
            d = [(ra[key] - rb[key]) * 100 for _, ra, rb in both]
            cells += [" / ".join(f"{x:+.2f}" for x in d), f"{mean(d):+.2f}"]
        lines.append(f"| {a} − {b} | {what} | {', '.join(str(s) for s, _, _ in both)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=60000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--objectives", nargs="+", default=DEFAULT, choices=[*OBJECTIVES, *DERIVED])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "methods")
    p.add_argument("--no-raw", action="store_true", help="do not compute the raw-pixel baseline (a cached one is kept)")
    p.add_argument("--eval-train", default=TRAIN, help="labelled shards the probes train on")
    p.add_argument("--eval-val", default=VAL, help="labelled shards the probes are scored on")
    p.add_argument("--parallel", type=int, default=1, help="runs at once (e.g. 8-12 on one GPU)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.jsonl"
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    raw = raw_pixels(args.out, args.eval_train, args.eval_val, compute=not args.no_raw)
    images = max(1, args.images // args.batch_size) * args.batch_size
    todo = [(name, seed) for seed in args.seeds  # seed-major: a cut-short bench has every objective once
            for name in args.objectives
            if not any(r["objective"] == name and r["seed"] == seed and r["batch"] == args.batch_size
                       and r["images"] == images for r in done)]
    # several runs at once where one leaves the machine idle (small models on a GPU); the rows
    # that re-export another's training start once every training has finished
    for wave in ([t for t in todo if t[0] not in DERIVED], [t for t in todo if t[0] in DERIVED]):
        with ThreadPoolExecutor(args.parallel) as pool:
            jobs = [pool.submit(run_one, name, seed, args.images, args.batch_size, args.eval_train,
                                args.eval_val, args.precision) for name, seed in wave]
            for job in as_completed(jobs):
                rec = job.result()
                print(json.dumps(rec), flush=True)
                with log.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                done.append(rec)
    text = table(done, raw)
    if pairs := pairs_table(done):
        text += "\n\n" + pairs
    (args.out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
