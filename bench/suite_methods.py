"""Every objective of the method table on the CPU transfer suite (suites/cpu.yaml), several seeds.

The backbones are bench/methods.py's runs (``runs/bench-methods/NAME-bBATCH-sSEED``, the method
table's budget and recipes); a missing one is trained by calling bench/methods.py for it. The
suite's data is written by bench/cpu_suite.py when ``data/suite`` lacks it. Then one
``selfsup-eval suite suites/cpu.yaml --baseline raw-pixels CKPT...`` judges them all (raw pixels
the reference of every verdict), and this script summarises per objective: each task, each group
and the mean as mean ± half-range over the seeds, and how many seeds' verdicts say better / no
clear difference / worse. The questions of issue 32: does I-JEPA lead on the structured tasks
(count, position, orientation, distance), do DCL / SimCLR lead on the natural-like ones (fmnist,
digits), and does I-JEPA's official initialisation (``ijepa``) lose to ``ijepa_fan_in`` on the
structured tasks as it did on Fashion-MNIST k-NN, or only there.

The evidence for bench/RESULTS.md (a CPU, the method table's 60k-image budget, 3 seeds):

    python bench/suite_methods.py --images 60000 --seeds 0 1 2 --out bench/results/suite-methods

Output: OUT/results.json (the suite's records), OUT/table.md (printed too).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from methods import DEFAULT, DERIVED, OBJECTIVES  # noqa: E402

OBJECTIVES_HERE = [*DEFAULT, "ijepa_fan_in"]
PROTOCOLS = ("knn", "linear", "knn_linear")


def run_dir(name: str, seed: int, batch: int) -> Path:
    return ROOT / "runs" / "bench-methods" / f"{name}-b{batch}-s{seed}"


def ensure_backbones(names, seeds, batch: int, images: int, out_dir: Path) -> list[tuple[str, int, Path]]:
    """The backbones, trained where missing; bench/methods.py's rows go to OUT/methods (not the
    method table's own runs.jsonl, whose rows were measured under other settings)."""
    out = []
    for name in names:
        for seed in seeds:
            ckpt = run_dir(name, seed, batch) / "export" / "backbone.safetensors"
            if not ckpt.is_file():
                print(f"suite_methods: training {name} seed {seed} (bench/methods.py)", flush=True)
                subprocess.run([sys.executable, str(ROOT / "bench" / "methods.py"), "--images", str(images),
                                "--seeds", str(seed), "--batch-size", str(batch), "--objectives", name,
                                "--no-raw", "--out", str(out_dir / "methods")], check=True, cwd=ROOT)
            if not ckpt.is_file():  # methods.py skips a run its runs.jsonl already holds
                raise SystemExit(f"suite_methods: {ckpt} is missing although bench/methods.py has its row; "
                                 "remove the row from its runs.jsonl (or restore the run) and rerun")
            out.append((name, seed, ckpt))
    return out


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * mean(values):.2f} ± {100 * (max(values) - min(values)) / 2:.2f}"


def table(records: list[dict], runs: list[tuple[str, int, Path]], protocol: str) -> str:
    by_path = {r["path"]: r for r in records}
    raw = records[0]
    tasks, groups = list(raw["suite"]["tasks"]), list(raw["suite"]["groups"])
    head = ["objective", "seeds"] + tasks + [f"{g} mean" for g in groups] + ["mean", "vs raw pixels"]
    rows = [["raw pixels", "–"] + [f"{100 * raw['suite']['tasks'][t][protocol]['top1']:.2f}" for t in tasks]
            + [f"{100 * raw['suite']['groups'][g][protocol]:.2f}" for g in groups]
            + [f"{100 * raw['suite']['mean'][protocol]:.2f}", "reference"]]
    names = list(dict.fromkeys(n for n, _, _ in runs))
    for name in names:
        rs = [by_path[str(p)] for n, _, p in runs if n == name]
        words = [r["verdicts"][protocol]["word"] for r in rs]
        tally = ", ".join(f"{words.count(w)} {w}" for w in ("better", "no clear difference", "worse") if w in words)
        rows.append([name, str(len(rs))]
                    + [spread([r["suite"]["tasks"][t][protocol]["top1"] for r in rs]) for t in tasks]
                    + [spread([r["suite"]["groups"][g][protocol] for r in rs]) for g in groups]
                    + [spread([r["suite"]["mean"][protocol] for r in rs]), tally])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return f"**{protocol}** top-1 (%), mean ± half-range over seeds\n\n" + "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=60000, help="the method table's budget (bench/methods.py)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--objectives", nargs="+", default=OBJECTIVES_HERE, choices=[*OBJECTIVES, *DERIVED])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "suite-methods")
    p.add_argument("--suite", default=str(ROOT / "suites" / "cpu.yaml"))
    args = p.parse_args()
    if not (ROOT / "data" / "suite" / ".written").is_file():
        subprocess.run([sys.executable, str(ROOT / "bench" / "cpu_suite.py"), "--out", str(ROOT / "data" / "suite")],
                       check=True, cwd=ROOT)
        (ROOT / "data" / "suite" / ".written").touch()
    runs = ensure_backbones(args.objectives, args.seeds, args.batch_size, args.images, args.out)
    suite_out = args.out / "suite"
    subprocess.run([sys.executable, "-m", "selfsup_eval", "suite", args.suite, "--baseline", "raw-pixels",
                    *[str(c) for _, _, c in runs], "--out", str(suite_out), "--protocols", *PROTOCOLS],
                   check=True, cwd=ROOT)
    records = json.loads((suite_out / "results.json").read_text())
    text = "\n\n".join(table(records, runs, p) for p in PROTOCOLS)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
