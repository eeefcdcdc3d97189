"""One place for each recipe key's contract: default, type, value rule, resume class and doc.

A recipe key is declared once, as a dataclass field built by :func:`key`; its metadata carries

* ``doc``: one line for the generated key reference (``selfsup-train --explain-keys``, which
  ``make recipe-doc`` writes to docs/recipe.md; a test fails when that file is stale);
* ``check``: a rule (:func:`at_least`, :func:`one_of`, ...) that says what a bad value must be
  instead, applied by :func:`selfsup.recipe_checks.problems` to every key;
* ``resume``: what a resume does when the value differs from the checkpoint's (:data:`FREE`,
  :data:`COMPUTE`, :data:`STRUCTURAL`), read by :mod:`selfsup.rundir`.

Before this, a key lived in four places (its field, a hand list of range checks, a list of resume
prefixes and a README table) and the copies drifted. Rules that relate two keys (the std list as
long as the mean list, a timm optimizer name) stay in :mod:`selfsup.recipe_checks`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import MISSING, field
from typing import Any, Callable, Iterator, Optional

FREE = "free"  # changes nothing that is computed: may differ on resume
COMPUTE = "compute"  # changes the run: refused on resume unless --accept-changes
STRUCTURAL = "structural"  # changes what the checkpoint's tensors are: refused always

Check = Callable[[Any], Optional[str]]  # value -> what it must be (None: fine)


def key(default: Any = MISSING, doc: str = "", *, check: Check | None = None,
        resume: str = COMPUTE, factory: Callable[[], Any] | None = None):
    """A recipe field: its default (or ``factory`` for lists and dicts) and its contract."""
    meta = {"doc": doc, "check": check, "resume": resume}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _rule(text: str, ok: Callable[[Any], bool], optional: bool = False) -> Check:
    def check(value):
        if optional and value is None:
            return None
        return None if ok(value) else text + (" (or null)" if optional else "")
    check.text = text + (" (or null)" if optional else "")  # shown in the key reference
    return check


def at_least(low: float, optional: bool = False) -> Check:
    return _rule(f">= {low}", lambda v: _number(v) and v >= low, optional)


def at_most(low: float, high: float) -> Check:
    return _rule(f"in [{low}, {high}]", lambda v: _number(v) and low <= v <= high)


def positive(optional: bool = False) -> Check:
    return _rule("> 0", lambda v: _number(v) and v > 0, optional)


def probability() -> Check:
    return at_most(0, 1)


def below_one() -> Check:
    return below(0, 1)


def below(low: float, high: float) -> Check:
    """``low <= value < high``."""
    return _rule(f"in [{low}, {high})", lambda v: _number(v) and low <= v < high)


def one_of(*choices: str) -> Check:
    return _rule("one of " + ", ".join(choices), lambda v: v in choices)


def unit_interval(optional: bool = False) -> Check:
    """``0 < value <= 1``."""
    return _rule("in (0, 1]", lambda v: _number(v) and 0 < v <= 1, optional)


def negative(optional: bool = False) -> Check:
    return _rule("< 0", lambda v: _number(v) and v < 0, optional)


def nonempty(what: str) -> Check:
    return _rule(what, lambda v: v is not None and bool(str(v).strip()))


def optional_bool() -> Check:
    return _rule("true, false or null", lambda v: v is None or isinstance(v, bool))


def pair(low: float, high: float | None = None) -> Check:
    """``[lo, hi]`` with ``low < lo <= hi`` (``<= high`` when given)."""
    bound = f"{low} < low <= high" + (f" <= {high}" if high is not None else "")

    def ok(v):
        if v is None or len(v) != 2 or not all(_number(x) for x in v):
            return False
        return v[0] > low and v[0] <= v[1] and (high is None or v[1] <= high)
    return _rule(f"[low, high] with {bound}", ok)


def fields(cls, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field]]:
    """``(dotted key, field)`` for every leaf field of the dataclass ``cls`` (nested sections
    walked; a field whose default is a dataclass is a section)."""
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        sub = _section_type(f)
        if sub is not None:
            yield from fields(sub, name + ".")
        else:
            yield name, f


def _section_type(f: dataclasses.Field):
    if f.default_factory is not MISSING:
        try:
            value = f.default_factory()
        except TypeError:
            return None
        if dataclasses.is_dataclass(value):
            return type(value)
    return None


def check_text(f: dataclasses.Field) -> str:
    check = f.metadata.get("check")
    return getattr(check, "text", "") if check else ""


def default_text(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default_factory is not MISSING else f.default
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
