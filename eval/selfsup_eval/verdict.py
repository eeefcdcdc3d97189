"""The paired verdict of a suite: is checkpoint B better than the reference A, or is it noise?

Both checkpoints are scored on the same draws and the same test images, so the comparison is
paired: for task t and draw s, ``d[t, s] = acc_B − acc_A`` is the mean over test images of
``correct_B − correct_A`` (each −1, 0 or 1). The reported difference is the unweighted mean over
tasks of the mean over draws (each task counts once, as in VTAB's mean).

The 95 % interval is a paired bootstrap over tasks × draws: each of ``B`` replicates resamples
the tasks with replacement, for each picked task one of its draws, and adds that draw's
test-set noise as a normal term with its standard error ``sd(correct_B − correct_A) / √n_test``
(resampling 10,000 test images per task per replicate costs far more and gives the same spread
to within a fraction of a percent for such sums of ±1/0). The interval is the 2.5 and 97.5
percentiles of the replicates' means. The word: ``better`` when the whole interval is above 0,
``worse`` when it is below, ``no clear difference`` otherwise. A checkpoint against itself has
every ``d`` and every standard error exactly 0, hence difference 0, interval [0, 0] and ``no clear
difference``. With a single task the interval only reflects that task's test-set noise.
"""

from __future__ import annotations

import torch

REPLICATES = 10000
SEED = 0
WORDS = ("better", "worse", "no clear difference")


def paired_stats(correct_b: torch.Tensor, correct_a: torch.Tensor) -> tuple[float, float]:
    """(mean difference, its standard error) of one draw's paired correctness vectors."""
    if correct_a.shape != correct_b.shape:
        raise ValueError("paired correctness vectors of different lengths")
    d = correct_b.double() - correct_a.double()
    se = float(d.std() / len(d) ** 0.5) if len(d) > 1 else 0.0
    return float(d.mean()), se


def verdict(per_task: dict[str, list[tuple[float, float]]], reference: str, replicates: int = REPLICATES,
            seed: int = SEED) -> dict:
    """``per_task``: {task: [(d, se) per draw]} → ``{reference, difference, interval, word,
    per_task: {task: mean d}}`` (differences as fractions, like the accuracies)."""
    names = list(per_task)
    if not names:
        raise ValueError("no tasks to compare")
    s = max(len(v) for v in per_task.values())
    d = torch.full((len(names), s), float("nan"), dtype=torch.float64)
    se = torch.zeros_like(d)
    counts = torch.tensor([len(per_task[n]) for n in names])
    for i, n in enumerate(names):
        for j, (m, e) in enumerate(per_task[n]):
            d[i, j], se[i, j] = m, e
    task_means = torch.stack([d[i, :counts[i]].mean() for i in range(len(names))])
    difference = float(task_means.mean())
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(len(names), (replicates, len(names)), generator=g)
    u = torch.rand(replicates, len(names), generator=g, dtype=torch.float64)
    j = (u * counts[t]).long()  # one draw of each picked task, uniformly among its draws
    z = torch.randn(replicates, len(names), generator=g, dtype=torch.float64)
    reps = (d[t, j] + se[t, j] * z).mean(1)
    low, high = (float(v) for v in torch.quantile(reps, torch.tensor([0.025, 0.975], dtype=torch.float64)))
    if torch.all(d.nan_to_num(0) == 0) and torch.all(se == 0):
        low = high = 0.0  # exactly 0, not a float-rounding neighbour
    word = "better" if low > 0 else "worse" if high < 0 else "no clear difference"
    return {"reference": reference, "difference": difference, "interval": [low, high], "word": word,
            "per_task": {n: float(m) for n, m in zip(names, task_means)}, "replicates": replicates}
