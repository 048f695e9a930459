"""The package's floors: a module imports from its own floor or below, never from above, and no modules import each
other in a circle (imports inside functions included: a lazy import is an import)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ee_diffusion"

# From the top down; docs/architecture.md shows the same table.
FLOORS = {
    "ee_diffusion.cli": 6,
    "ee_diffusion.bench": 5,
    "ee_diffusion.training": 5,
    "ee_diffusion.calibration": 5,
    "ee_diffusion.pipelines": 4,
    "ee_diffusion.comfyui_exits": 4,
    "ee_diffusion.exits": 3,
    "ee_diffusion.schedules": 2,
    "ee_diffusion.dllm": 2,
    "ee_diffusion.metrics": 1,
    "ee_diffusion.data": 1,
    "ee_diffusion.outputs": 1,
    "ee_diffusion.shipped": 1,
    "ee_diffusion.validation": 1,
    "ee_diffusion.errors": 1,
    "ee_diffusion.lazy_imports": 1,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports (the longest known prefix of each imported name)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and not (name == target or name.startswith(target + ".")):  # its own packages come with it
                found.add(target)
    return found


def _floor(module: str) -> int:
    prefix = max((p for p in FLOORS if module == p or module.startswith(p + ".")), key=len, default=None)
    assert prefix is not None, f"{module} has no floor: add it to FLOORS and to docs/architecture.md"
    return FLOORS[prefix]


GRAPH = {name: _imports(name, path, set(_modules())) for name, path in _modules().items()}


@pytest.mark.parametrize("module", sorted(name for name in GRAPH if name != "ee_diffusion"))
def test_no_module_imports_from_a_higher_floor(module):
    above = {target: _floor(target) for target in GRAPH[module] if _floor(target) > _floor(module)}
    assert not above, f"{module} (floor {_floor(module)}) imports from higher floors: {above}"


def _package_of(module: str) -> str:
    return max((p for p in FLOORS if module == p or module.startswith(p + ".")), key=len)


def test_no_circle_between_modules_nor_between_rooms():
    """No module reaches itself through imports; nor does a room (a subpackage or top-level module) through other
    rooms."""
    rooms = {}
    for module, targets in GRAPH.items():
        if module != "ee_diffusion":
            rooms.setdefault(_package_of(module), set()).update(_package_of(t) for t in targets)
    for graph in (GRAPH, {room: targets - {room} for room, targets in rooms.items()}):
        _assert_acyclic(graph)


def _assert_acyclic(graph: dict[str, set[str]]) -> None:
    state: dict[str, int] = {}  # 1: on the path being walked, 2: done

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            assert state.get(target) != 1, f"circle: {' -> '.join([*trail, node, target])}"
            if target not in state:
                visit(target, [*trail, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_the_architecture_page_shows_these_floors():
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    for prefix, floor in FLOORS.items():
        path = prefix.replace(".", "/")
        shown = f"`{path}/`" if (PACKAGE.parent / path).is_dir() else f"{path.rpartition('/')[2]}.py"
        row = next((line for line in page.splitlines() if shown in line), None)
        assert row is not None and row.startswith(f"| {floor} |"), (prefix, floor, row)
