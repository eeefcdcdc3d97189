"""How many unreadable samples a split may have before its accuracy means nothing.

Unreadable samples (an image that does not decode, no image, a bad label) are skipped and
counted; scored without them, a split that is mostly unreadable still gives a confident-looking
number (8 readable samples of 80 once gave a table entry of 37.50 and exit 0). So, as
``data.max_corrupt_fraction`` does in training, more than ``--max-corrupt-fraction`` of a split
(default 1 %) is an error naming the split, the count and a few keys.
"""

from __future__ import annotations

from selfsup_eval.checkpoint import EvalError

DEFAULT_MAX_CORRUPT_FRACTION = 0.01


def check_corrupt_fraction(feats: dict, split: str, limit: float, name: str) -> None:
    """Raise :class:`EvalError` when the skipped samples of ``feats`` (cached_features' result)
    are more than ``limit`` of the split's samples."""
    bad, good = feats["corrupt"], len(feats["label"])
    if bad and bad > limit * (bad + good):
        keys = ", ".join(feats["corrupt_keys"][:3])
        raise EvalError(f"{bad} of the {bad + good} samples of the {split} split could not be used "
                        f"for {name} ({bad / (bad + good):.1%}: undecodable image, no image or a bad "
                        f"label; e.g. {keys}), more than --max-corrupt-fraction={limit}: repair the "
                        "shards, or raise --max-corrupt-fraction to score the rest")
