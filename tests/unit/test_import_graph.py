"""The import graph: no cycles between modules, and imports point down the layers (see docs/architecture.md).

Every ``import`` counts, including the lazy ones inside functions: a lazy import still ties the two
modules together, it only hides the cycle from Python's start-up.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

# Bottom to top. A unit (the first level under facefuse/) may import units of its own layer or lower ones.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "v1", "__init__"),
    ("rpc", "io", "geometry"),
    ("models", "render", "texture"),
    ("assets",),
    ("face", "fusion", "tracking"),
    ("wire",),
    ("packs", "eval"),
    ("pipeline",),
    ("servers",),
    ("client",),
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in (SRC / "facefuse").rglob("*.py") if "v1" not in p.parts}
    known = set(modules) | {m.rsplit(".", 1)[0] for m in modules}
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            for target in targets:
                if not target.startswith("facefuse."):
                    continue
                # the deepest known module the import names (``from a.b import c`` may name a function c)
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in known and target != name and target in modules:
                    graph[name].add(target)
                    break
    return graph


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(unit: str) -> int:
    for index, layer in enumerate(LAYERS):
        if unit in layer:
            return index
    raise AssertionError(f"facefuse.{unit} is in no layer of tests/unit/test_import_graph.py: place it there")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    assert _cycles(_imports()) == []


def test_imports_point_down() -> None:
    upward = sorted(f"{src} -> {dst}" for src, targets in _imports().items() for dst in targets
                    if _layer(_unit(dst)) > _layer(_unit(src)))
    assert upward == []


def test_the_checker_sees_cycles_and_upward_imports() -> None:
    graph = {"facefuse.a.x": {"facefuse.b.y"}, "facefuse.b.y": {"facefuse.a.x"}, "facefuse.c": set()}
    assert _cycles(graph) == [["facefuse.a.x", "facefuse.b.y"]]
    assert _layer("client") > _layer("rpc")
