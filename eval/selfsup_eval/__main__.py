"""``python -m selfsup_eval ...`` (the same as ``selfsup-eval``; handy under torchrun ``-m``)."""

import sys

from selfsup_eval.cli import main

sys.exit(main())
