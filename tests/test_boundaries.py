"""Package boundaries: the trainer (selfsup) and the evaluator (selfsup_eval) never import each
other, both may import selfsup_io, which imports neither; and no two modules of one package
import each other (directly or round a longer cycle), lazily inside a function included."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = {"selfsup": ROOT / "ssl" / "selfsup", "selfsup_io": ROOT / "ssl" / "selfsup_io",
            "selfsup_eval": ROOT / "eval" / "selfsup_eval"}


def modules() -> dict[str, Path]:
    out = {}
    for package, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join((package, *parts))
            out[name.removesuffix(".__init__")] = path
    return out


def imports(path: Path, name: str) -> set[str]:
    """Every module a file imports, at the top or inside a function (relative imports resolved)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            subs = {f"{base}.{alias.name}" for alias in node.names}
            found.update(subs)
            # ``from pkg import module`` needs pkg's submodule, not what pkg's __init__ defines
            found.add((base, frozenset(subs)))
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()

    def deps(path, name):
        out = set()
        for item in imports(path, name):
            if isinstance(item, tuple):
                base, subs = item
                if not subs <= set(mods):
                    out.add(base)
            else:
                out.add(item)
        return {m for m in out if m in mods and m != name}
    return {name: deps(path, name) for name, path in mods.items()}


def test_trainer_and_evaluator_do_not_import_each_other():
    bad = []
    for name, deps in graph().items():
        top = name.split(".")[0]
        for dep in deps:
            other = dep.split(".")[0]
            if (top, other) in {("selfsup", "selfsup_eval"), ("selfsup_eval", "selfsup"),
                                ("selfsup_io", "selfsup"), ("selfsup_io", "selfsup_eval")}:
                bad.append(f"{name} -> {dep}")
    assert not bad, bad


def test_no_import_cycles():
    g = graph()
    # Tarjan's strongly connected components: a component of more than one module is a cycle
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            # a package's __init__ importing its own submodules (a registry) is not a cycle
            pkg_init = [m for m in comp if any(o.startswith(m + ".") for o in comp)]
            if len(comp) > 1 and len(comp) - len(pkg_init) > 1:
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, cycles
