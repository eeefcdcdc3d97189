"""``selfsup-train RECIPE [key=value ...]``.

Errors a user can fix (recipe keys, shard paths, checkpoints, model names) are printed as one line
``selfsup-train: error: ...`` with exit code 2, not as a traceback from deep inside torch. A run
whose loss or weights become NaN/inf stops with one such line and exit code 3, its last good
checkpoint untouched.
"""

from __future__ import annotations

import argparse
import sys

from selfsup.config import load_recipe
from selfsup.errors import UserError
DIVERGED_EXIT_CODE = 3  # NaN/inf loss or weights: not requeued (75), not a bad recipe (2)


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="selfsup-train",
        description="Pretrain a backbone with a recipe (recipes/*.yaml) and key=value overrides.")
    parser.add_argument("items", nargs="*", metavar="RECIPE|key=value",
                        help="recipe YAML files merged in order (e.g. recipes/dcl.yaml "
                             "recipes/data/fashion_mnist.yaml), then key=value overrides")
    parser.add_argument("--print-recipe", action="store_true",
                        help="print the resolved recipe and exit")
    parser.add_argument("--accept-changes", action="store_true",
                        help="resume even though the recipe differs from the checkpoint's in "
                             "values that change the run (e.g. a lower optim.lr after a divergence, "
                             "a longer train.max_steps); without it such a resume is refused")
    parser.add_argument("--explain-keys", action="store_true",
                        help="print every recipe key (default, rule, resume class, meaning) as Markdown "
                             "and exit; docs/recipe.md is this output")
    args = parser.parse_intermixed_args(argv)
    if args.explain_keys:
        from selfsup.recipe_doc import render

        print(render(), end="")
        return 0
    if not args.items:
        parser.error("a recipe is required (e.g. recipes/tiny.yaml)")
    from selfsup.trainer import Diverged
    from selfsup_io.errors import UsageError

    try:
        recipes = [a for a in args.items if "=" not in a]
        overrides = [a for a in args.items if "=" in a]
        if args.print_recipe:
            from omegaconf import OmegaConf

            try:
                print(OmegaConf.to_yaml(load_recipe(recipes, overrides)), end="")
            except UserError as e:
                raise UsageError(f"selfsup-train: error: {e}") from None
            return 0
        run_training(recipes, overrides, args.accept_changes)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    except Diverged as e:
        print(f"selfsup-train: error: {e}", file=sys.stderr)
        return DIVERGED_EXIT_CODE
    return 0


def run_training(recipes, overrides=(), accept_changes: bool = False) -> str:
    """Resolve and check the recipe(s) + ``key=value`` overrides, train, return the run directory.

    The CLI and the Python API (:func:`selfsup.api.train`) both come here. A user-fixable problem
    raises :class:`selfsup_io.errors.UsageError` whose message is the CLI's line
    (``selfsup-train: error: ...``); a divergence raises :class:`selfsup.trainer.Diverged`.
    """
    from selfsup_io.errors import UsageError

    try:
        cfg = load_recipe(recipes, list(overrides))
        from selfsup.stopping import Preempted, StoppedWaiting
        from selfsup.build import end_distributed
        from selfsup.trainer import Diverged, Trainer

        trainer = Trainer(cfg, accept_changes=accept_changes)
        try:
            trainer.train()
        except StoppedWaiting:  # this rank alone, maybe with peers stuck in a collective
            raise
        except (Preempted, Diverged):  # every rank stops at the same step, so every rank gets here
            end_distributed(trainer.acc)
            raise
        end_distributed(trainer.acc)
    except UserError as e:
        raise UsageError(f"selfsup-train: error: {e}") from None
    return str(cfg.run.dir)


if __name__ == "__main__":
    sys.exit(train_main())
