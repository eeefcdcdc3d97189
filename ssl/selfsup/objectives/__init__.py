"""Objectives: one file each, registered under their recipe name.

The trainer only knows the :class:`~selfsup.objectives.base.Objective` interface; it never
branches on an objective's name. To add one, write ``objectives/NAME.py`` with a subclass
decorated by ``@register("NAME")`` and import it below.
"""

from selfsup.objectives.base import Objective, build_objective, objective_config, register, registered

from selfsup.objectives import simclr  # noqa: E402,F401  (registers "simclr")
from selfsup.objectives import moco  # noqa: E402,F401  (registers "moco")
from selfsup.objectives import ijepa  # noqa: E402,F401  (registers "ijepa")
from selfsup.objectives import jigclu  # noqa: E402,F401  (registers "jigclu")

__all__ = ["Objective", "build_objective", "objective_config", "register", "registered"]
