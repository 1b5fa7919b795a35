"""The core's import graph: no cycle, and no module importing from a layer above its own.

Every ``import`` and ``from ... import`` statement in ``core/src/curvprune`` counts, wherever it
stands: at module level, inside a function, or under ``if TYPE_CHECKING:``. The layers, bottom
to top, are documented in docs/architecture.md; a module may import its own layer and the ones
below it, and within a layer the imports must still form no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import curvprune

SRC = Path(curvprune.__file__).resolve().parent

#: Bottom to top. A module's layer is the first entry that is its name or a package above it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("curvprune.errors", "curvprune._log", "curvprune._progress"),
    ("curvprune.tensors",),
    ("curvprune.structure",),
    ("curvprune.roles",),
    ("curvprune.plugin",),
    ("curvprune.config",),
    ("curvprune.builtin",),
    ("curvprune.pipeline",),
    ("curvprune.run",),
    ("curvprune.api", "curvprune.cli", "curvprune"),
    ("curvprune.testing",),
)


def _module_name(path: Path) -> str:
    parts = ["curvprune", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every curvprune module ``name`` imports, resolved to a module of the source tree."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from pkg import sub`` imports the submodule when there is one
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module
                       for a in node.names]
        for target in targets:
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name:
                found.add(target)
    return found


def _layer(name: str) -> int:
    best = None
    for index, layer in enumerate(LAYERS):
        for prefix in layer:
            if name == prefix or name.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    assert best is not None, f"{name} belongs to no layer: add it to LAYERS and the docs"
    return best[0]


GRAPH = {name: _imports(name, path, _modules()) for name, path in _modules().items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_the_graph_is_found():
    # guards the parser: the pipeline must be seen importing the roles and the tensor layer
    assert "curvprune.roles.scorer" in GRAPH["curvprune.pipeline.pipeline"]
    assert "curvprune.tensors.layout" in GRAPH["curvprune.roles.estimator"]


def test_no_import_cycle():
    assert _cycles(GRAPH) == []


def test_cycle_detection_finds_a_planted_cycle():
    planted = {k: set(v) for k, v in GRAPH.items()}
    planted["curvprune.tensors.layout"].add("curvprune.structure.graph")
    assert ["curvprune.structure.graph", "curvprune.tensors.layout"] in _cycles(planted)


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_imports_only_its_own_layer_or_below(name):
    upward = sorted(t for t in GRAPH[name] if _layer(t) > _layer(name))
    assert not upward, f"{name} (layer {_layer(name)}) imports a higher layer: {upward}"


def test_core_modules_stay_small():
    """About 500 lines at most, unless the module says why it is one cohesive thing."""
    long = [
        f"{name} ({len(path.read_text().splitlines())} lines)"
        for name, path in _modules().items()
        if len(path.read_text().splitlines()) > 520 and "cohesive" not in path.read_text()[:3000]
    ]
    assert not long
