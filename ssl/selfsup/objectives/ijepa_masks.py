"""I-JEPA's multi-block masks, drawn from explicit generators (docs/methods.md §3.3).

The official collator (``facebookresearch/ijepa`` ``src/masks/multiblock.py``, ported to lightly
as ``IJEPAMaskCollator``) seeds the *block sizes* from a step counter shared by the processes but
draws the *block positions* from the global torch RNG inside data-loader workers, so a resumed run
gets different masks. This sampler makes the same draws, in the same order, from two generators the
caller owns: ``size_generator`` (the same on every process, so every rank uses one target size, as
the official counter gives) and ``generator`` (per rank, checkpointed by the trainer). Given the
same seeds it returns exactly lightly's masks (tested), including the official quirks:

* one uniform draw sets both the scale and the aspect ratio of a block size;
* one target size and one context size per batch, positions per image;
* ``randint(0, H - h)`` excludes ``H - h``: a block never touches the last row/column;
* the context block loses every target patch (``allow_overlap=False``); it is redrawn while it has
  ``<= min_keep`` patches, and after 20 failures per level one constraint is dropped (counted in
  :attr:`relaxed`, the official code only warns);
* each image's index lists are cut to the batch's shortest, so they stack to (B, K).
"""

from __future__ import annotations

import math

import numpy as np
import torch


class MultiBlockMasks:
    def __init__(self, grid: tuple[int, int], num_targets: int = 4, target_scale=(0.15, 0.2),
                 target_aspect=(0.75, 1.5), num_context: int = 1, context_scale=(0.85, 1.0),
                 min_keep: int = 10, allow_overlap: bool = False):
        self.height, self.width = int(grid[0]), int(grid[1])
        self.num_targets, self.num_context = int(num_targets), int(num_context)
        self.target_scale, self.target_aspect = tuple(target_scale), tuple(target_aspect)
        self.context_scale = tuple(context_scale)
        self.min_keep, self.allow_overlap = int(min_keep), bool(allow_overlap)
        self.relaxed = 0  # constraint relaxations so far (the official code warns instead)
        smallest = min(h * w for h, w in (self._size(u / 100, self.target_scale, self.target_aspect)
                                          for u in range(101)))
        if smallest <= self.min_keep:  # the official sampler would retry such a block forever
            raise ValueError(f"target blocks can be as small as {smallest} patches on the "
                             f"{self.height}x{self.width} grid, not more than min_keep={self.min_keep}: "
                             "lower min_keep or raise target_scale")

    def block_size(self, generator: torch.Generator, scale, aspect) -> tuple[int, int]:
        u = torch.rand(1, generator=generator).item()  # one draw for both (official quirk)
        return self._size(u, scale, aspect)

    def _size(self, u: float, scale, aspect) -> tuple[int, int]:
        keep = int(self.height * self.width * (scale[0] + u * (scale[1] - scale[0])))
        ar = aspect[0] + u * (aspect[1] - aspect[0])
        h, w = int(round(math.sqrt(keep * ar))), int(round(math.sqrt(keep / ar)))
        return min(h, self.height - 1), min(w, self.width - 1)

    def block(self, size: tuple[int, int], generator: torch.Generator,
              acceptable: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Indices of one block of ``size`` (minus what ``acceptable`` excludes) and the block's
        complement (an (H, W) boolean map, the region the context may keep). The maps are numpy:
        a batch of 128 makes ~700 of them, and torch's per-op overhead made the sampler cost
        ~19 ms per batch on the host, where a GPU step of ViT-S takes ~190 ms."""
        h, w = size
        tries, left_in_level = 0, 20
        while True:
            top = int(torch.randint(0, self.height - h, (1,), generator=generator))
            left = int(torch.randint(0, self.width - w, (1,), generator=generator))
            mask = np.zeros((self.height, self.width), dtype=bool)
            mask[top:top + h, left:left + w] = True
            if acceptable is not None:
                for region in acceptable[:max(len(acceptable) - tries, 0)]:
                    mask &= region
            idx = np.flatnonzero(mask)
            if len(idx) > self.min_keep:
                break
            left_in_level -= 1
            if left_in_level == 0:
                tries, left_in_level = tries + 1, 20
                self.relaxed += 1
        complement = np.ones((self.height, self.width), dtype=bool)
        complement[top:top + h, left:left + w] = False
        return idx, complement

    def __call__(self, batch_size: int, size_generator: torch.Generator,
                 generator: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(context, targets)``: ``num_context`` and ``num_targets`` LongTensors of shape
        (B, K), patch indices in row-major order of the grid."""
        t_size = self.block_size(size_generator, self.target_scale, self.target_aspect)
        c_size = self.block_size(size_generator, self.context_scale, (1.0, 1.0))
        targets, contexts = [], []
        for _ in range(batch_size):
            blocks = [self.block(t_size, generator) for _ in range(self.num_targets)]
            targets.append([idx for idx, _ in blocks])
            acceptable = None if self.allow_overlap else [c for _, c in blocks]
            contexts.append([self.block(c_size, generator, acceptable)[0]
                             for _ in range(self.num_context)])
        return _stack(contexts, self.num_context), _stack(targets, self.num_targets)


def _stack(per_image: list[list[np.ndarray]], n: int) -> list[torch.Tensor]:
    keep = min(len(idx) for masks in per_image for idx in masks)
    return [torch.from_numpy(np.stack([masks[j][:keep] for masks in per_image]).astype(np.int64))
            for j in range(n)]
