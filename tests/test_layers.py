"""The package layout stays what the README's Development section shows: read from the source
with ``ast``, so a new import that climbs a layer or closes a cycle fails here, not in review.

Layers, bottom to top: the bottom modules -> config -> hardware, transport -> inference ->
updates, ops, modeltools -> daemon -> cli. A module may import its own layer's package and
any lower layer; siblings on one layer (hardware and transport; updates, ops and modeltools)
may not import each other. Imports inside functions count: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "agent"

BOTTOM = (
    "agent",
    "agent.errors",
    "agent.logs",
    "agent.durable",
    "agent.topics",
    "agent.strenum",
    "agent.procfs",
    "agent.pip_hint",
)
LAYERS: dict[str, int] = {
    **dict.fromkeys(BOTTOM, 0),
    "agent.config": 1,
    "agent.hardware": 2,
    "agent.transport": 2,
    "agent.inference": 3,
    "agent.updates": 4,
    "agent.ops": 4,
    "agent.modeltools": 4,
    "agent.integrations": 4,
    "agent.daemon": 5,
    "agent.cli": 6,
}
# `python -m agent` is the command line's other door.
ALIASES = {"agent.__main__": "agent.cli"}
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 250


def module_name(path: Path) -> str:
    """``agent/inference/pipeline.py`` -> ``agent.inference.pipeline``."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The package's modules ``path`` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in known:
                found.add(node.module)
            # `from agent.inference import postprocess` imports a module, not a name
            found.update(
                f"{node.module}.{alias.name}"
                for alias in node.names
                if f"{node.module}.{alias.name}" in known
            )
    return found


def layer_of(module: str) -> tuple[str, int]:
    """The layer a module belongs to: its subpackage (``agent.inference``) and its rank."""
    module = ALIASES.get(module, module)
    if module in LAYERS:
        return module, LAYERS[module]
    package = ".".join(module.split(".")[:2])
    if package not in LAYERS:
        pytest.fail(f"{module} is in no layer: add its package to LAYERS and the README")
    return package, LAYERS[package]


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    modules = source_modules()
    known = set(modules)
    return {name: imported_modules(path, known) - {name} for name, path in modules.items()}


def test_no_module_imports_a_higher_layer_or_a_sibling() -> None:
    wrong = []
    for module, imports in import_graph().items():
        package, rank = layer_of(module)
        for imported in imports:
            other, other_rank = layer_of(imported)
            if other_rank > rank or (other_rank == rank and other != package and rank > 0):
                wrong.append(f"{module} imports {imported} ({other} is not below {package})")
    assert wrong == []


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    done: set[str] = set()
    cycles: list[str] = []

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycles.append(" -> ".join([*path[path.index(module) :], module]))
            return
        if module in done:
            return
        for imported in sorted(graph[module]):
            visit(imported, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert cycles == []


def test_every_subpackage_says_what_it_is_for() -> None:
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        docstring = ast.get_docstring(ast.parse(init.read_text()))
        assert docstring, (
            f"{init} needs a docstring: what the package is for, what it must not import"
        )
        assert "import" in docstring.lower(), (
            f"{init}'s docstring should say what it must not import"
        )


def test_modules_and_classes_stay_small() -> None:
    too_big = []
    for module, path in source_modules().items():
        tree = ast.parse(path.read_text())
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            too_big.append(f"{module}: {lines} lines")
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                size = node.end_lineno - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    too_big.append(f"{module}.{node.name}: {size} lines")
    assert too_big == []
