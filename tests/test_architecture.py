"""The import graph of mixrun's own modules, read from the source: every import statement counts, at module level,
inside functions or under ``TYPE_CHECKING``. It must have no cycles, and data must flow one way.

``lint-imports`` (import-linter, run by ``.ci/run``) enforces the same direction on the ``mixrun`` package; it does
not see ``mixrun.tui``, whose files live in the top-level ``tui/`` folder, so the rules about the TUI are here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> the package it ships as (pyproject.toml's package-dir)
PACKAGES = {"mixrun": "mixrun", "tui": "mixrun.tui", "profiles": "mixrun.profiles"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The mixrun modules ``name`` imports anywhere in its file (a package import counts as its ``__init__``)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([mod] if mod else []))
            # ``from pkg import module`` depends on that module (a package's __init__ runs for any of its modules)
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        for t in targets:
            while t and t not in MODULES:  # "mixrun.planner.types.Candidate" -> "mixrun.planner.types"
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_the_graph_is_read_from_every_module() -> None:
    assert {"mixrun.cli", "mixrun.planner", "mixrun.run", "mixrun.tui.app", "mixrun.backends.torch.engine"} <= set(GRAPH)
    assert "mixrun.planner.types" in GRAPH["mixrun.run"]  # a module-level import
    assert "mixrun.run" in GRAPH["mixrun.cli"]  # imported inside a function


def test_the_cycle_finder_finds_a_lazy_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    assert _cycles(GRAPH) == []


@pytest.mark.parametrize(("layer", "must_not_import"), [
    ("mixrun.planner", ("mixrun.backends", "mixrun.tui", "mixrun.cli", "mixrun.run", "mixrun.bench", "mixrun.chat")),
    ("mixrun.backends", ("mixrun.tui", "mixrun.cli", "mixrun.run", "mixrun.bench")),
    ("mixrun.run", ("mixrun.tui", "mixrun.cli")),
])
def test_data_flows_one_way(layer: str, must_not_import: tuple[str, ...]) -> None:
    bad = sorted((m, t) for m, ts in GRAPH.items() if m == layer or m.startswith(layer + ".") for t in ts
                 if any(t == x or t.startswith(x + ".") for x in must_not_import))
    assert bad == []


def test_only_the_cli_imports_the_tui() -> None:
    bad = sorted(m for m, ts in GRAPH.items() if not m.startswith("mixrun.tui") and m != "mixrun.cli"
                 and any(t.startswith("mixrun.tui") for t in ts))
    assert bad == []
