"""Host time of I-JEPA's multi-block mask sampling per batch: selfsup's sampler vs lightly's
``IJEPAMaskCollator`` (the official collator's port), same seeds, same masks.

The I-JEPA step draws its masks on the host before the GPU can start (see
selfsup.objectives.ijepa_masks), so this time is added to every step that does not hide it:

    python bench/masks.py [--grids 14 16] [--batch-size 128] [--repeat 20]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from lightly.data import IJEPAMaskCollator

from selfsup.objectives.ijepa_masks import MultiBlockMasks


def per_batch_ms(fn, repeat: int) -> float:
    fn(0)  # warm-up
    t = time.perf_counter()
    for i in range(repeat):
        fn(i + 1)
    return (time.perf_counter() - t) / repeat * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grids", type=int, nargs="+", default=[14, 16])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(1)
    print("| patch grid | batch | lightly IJEPAMaskCollator | selfsup MultiBlockMasks | ratio | same masks |")
    print("|---|---|---|---|---|---|")
    for grid in args.grids:
        ours = MultiBlockMasks((grid, grid))
        collator = IJEPAMaskCollator(input_size=grid * 16, patch_size=16, enc_mask_scale=(0.85, 1.0),
                                     pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5), nenc=1,
                                     npred=4, min_keep=10, allow_overlap=False)  # the paper's
        images = [torch.zeros(1)] * args.batch_size

        def lightly_batch(seed):
            collator._itr_counter.value = seed - 1
            torch.manual_seed(100 + seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, enc, pred = collator(images)
            return enc + pred

        def selfsup_batch(seed):
            ctx, tgt = ours(args.batch_size, torch.Generator().manual_seed(seed),
                            torch.Generator().manual_seed(100 + seed))
            return ctx + tgt

        same = all(torch.equal(a, b) for s in range(3)
                   for a, b in zip(lightly_batch(s), selfsup_batch(s)))
        theirs = per_batch_ms(lightly_batch, args.repeat)
        mine = per_batch_ms(selfsup_batch, args.repeat)
        print(f"| {grid}x{grid} | {args.batch_size} | {theirs:.1f} ms | {mine:.1f} ms | "
              f"{theirs / mine:.2f} | {same} |")


if __name__ == "__main__":
    main()
