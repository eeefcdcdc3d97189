"""``selfsup-train`` as a script, for torchrun in the tests (argv is the CLI's)."""

import sys

from selfsup.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
