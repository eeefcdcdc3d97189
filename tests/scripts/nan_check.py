"""``selfsup-train`` under torchrun with a NaN loss on the LAST rank only, in its forward pass
CALL (argv[1]); the rest of argv is passed to the CLI. DDP spreads the NaN gradient to every rank,
so every rank must stop at the same step with exit code 3, none left waiting in a collective.
Used by tests/test_distributed.py."""

import os
import sys

from selfsup.cli import train_main
from selfsup.objectives.simclr import SimCLR


def main(call: int, argv: list[str]) -> int:
    calls, forward = [], SimCLR.forward
    poisoned_rank = int(os.environ["WORLD_SIZE"]) - 1

    def poisoned(self, batch, generator):
        loss, metrics = forward(self, batch, generator)
        calls.append(1)
        if len(calls) == call and int(os.environ["RANK"]) == poisoned_rank:
            loss = loss * float("nan")
        return loss, metrics

    SimCLR.forward = poisoned
    rc = train_main(argv)
    print(f"rank {os.environ['RANK']}: exit {rc} after {len(calls)} forward passes", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), sys.argv[2:]))
