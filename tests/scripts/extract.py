"""Under torchrun: extract features of CHECKPOINT on SHARDS with selfsup_eval and save them
(rank 0) to OUT. Used by test_eval.py to compare 1 and 2 processes."""

import os
import sys

import torch
import torch.distributed as dist

from selfsup_eval.checkpoint import load_backbone
from selfsup_eval.features import extract

if __name__ == "__main__":
    ckpt, shards, out = sys.argv[1:4]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    from selfsup_io.shards import resolve_shards

    feats = extract(load_backbone(ckpt), resolve_shards(shards).urls, batch_size=7)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(feats, out)
    if dist.is_initialized():  # every rank waits for rank 0's file, then all leave gloo together
        dist.barrier()
        dist.destroy_process_group()
