"""The package's layers: imports point down only, and no module imports itself back.

From the top: ``ops`` -> ``backend`` -> the SDK adapters (``events``, ``stores``) ->
``options`` -> the format and event log (``log``) -> Redis plumbing (``connection``).
``errors`` and ``version`` sit below everything. Read from the source (the ``ast`` of each
module), type-checking-only imports included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "a2a_redis"

#: Rank of each layer: a module may import only from layers of lower or equal rank.
RANKS = {
    "errors": 0,
    "version": 0,
    "telemetry": 0,  # OpenTelemetry hooks, called from every layer
    "connection": 1,
    "log": 2,
    "options": 3,
    "stores": 4,
    "events": 5,  # the event stream pairs with a task store: events may import stores
    "push": 6,  # push delivery follows the event logs and reads the push configs
    "handlers": 7,  # the SDK's request handlers, over stores and events
    "backend": 8,
    "ops": 9,
    "__init__": 10,
}


def _modules() -> dict[str, Path]:
    return {
        ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts): path
        for path in PACKAGE.rglob("*.py")
    }


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``module`` imports (``from a2a_redis.x import y`` names
    module ``a2a_redis.x.y`` when that is a module or a package, else ``a2a_redis.x``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("a2a_redis"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not node.module.startswith("a2a_redis"):
                continue
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                if candidate + ".__init__" in known:  # a package: a2a_redis.telemetry
                    candidate += ".__init__"
                found.add(candidate if candidate in known else node.module)
    found.discard(module)
    resolved = {m for m in found if m in known}
    resolved |= {m + ".__init__" for m in found if m + ".__init__" in known}
    return resolved


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {m: _imports(m, p, known) for m, p in modules.items()}


def test_every_module_is_in_a_known_layer() -> None:
    assert {_layer(m) for m in _modules()} <= set(RANKS)


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_point_down(module: str) -> None:
    if module == "a2a_redis.__init__":
        return  # the public API re-exports from every layer
    upward = [
        target
        for target in _graph()[module]
        if not target.endswith("__init__") and RANKS[_layer(target)] > RANKS[_layer(module)]
    ]
    assert upward == [], f"{module} imports from a higher layer: {upward}"


def test_no_import_cycle() -> None:
    graph = _graph()
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycle = [*path[path.index(node) :], node]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if node in done:
            return
        for target in sorted(graph.get(node, ())):
            visit(target, [*path, node])
        done.add(node)

    for module in sorted(graph):
        visit(module, [])


def test_no_module_is_over_450_lines() -> None:
    sizes = {m: len(p.read_text().splitlines()) for m, p in _modules().items()}
    assert {m: n for m, n in sizes.items() if n > 450} == {}
