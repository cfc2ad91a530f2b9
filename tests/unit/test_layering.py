"""The packages' arrows: crdt, kvevents -> mesh -> sim -> bench, plan -> cli; no module cycles.

Every import in the source tree is read (module level and function level alike; imports for
type checkers only, under ``if TYPE_CHECKING:``, do not run and do not count) and checked
against the layer order; a cycle between modules is reported with its path.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = {"crdt": 0, "kvevents": 0, "mesh": 1, "sim": 2, "bench": 3, "plan": 3, "cli": 4}
"""A package may import its own layer's packages below it in this order, never above;
crdt and kvevents import neither each other's internals above them nor anything else."""
ALLOWED_SAME_LAYER = {("kvevents", "crdt")}
"""kvevents writes slices through crdt's version type; crdt imports nothing of kvevents."""


def modules() -> dict[str, Path]:
    out = {}
    for pkg in LAYERS:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = path
    return out


def imports(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """Project modules ``path`` imports (resolving ``from pkg import mod`` to the module)."""
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) in {"TYPE_CHECKING",
                                                                   "typing.TYPE_CHECKING"}
        for stmt in node.body
        for inner in ast.walk(stmt)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] in LAYERS)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] not in LAYERS:
                continue
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in known else node.module)
    return {m for m in found if m != name}


def test_no_package_imports_a_package_above_it() -> None:
    known = modules()
    wrong = []
    for name, path in known.items():
        here = name.split(".")[0]
        for dep in imports(path, name, known):
            there = dep.split(".")[0]
            if there == here:
                continue
            if LAYERS[there] > LAYERS[here] or (
                LAYERS[there] == LAYERS[here] and (here, there) not in ALLOWED_SAME_LAYER
            ):
                wrong.append(f"{name} imports {dep}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles_between_modules() -> None:
    known = modules()
    graph = {name: {d for d in imports(path, name, known) if d in known}
             for name, path in known.items()}
    # A package's __init__ importing its own submodules is how packages work, not a cycle.
    for name in graph:
        graph[name] = {d for d in graph[name] if not d.startswith(name + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                cycles.append(" -> ".join([*stack[stack.index(d):], d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "\n".join(cycles)
