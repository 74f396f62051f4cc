"""The package's shape: no module over 450 lines, no import cycle among bd's modules (function-
local imports included), every module importable."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

BD = Path(__file__).resolve().parents[1] / "bd"
MAX_LINES = 450


def _module_name(path: Path) -> str:
    parts = path.relative_to(BD.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(BD.rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """The bd modules ``name`` imports, anywhere in its code (a package's __init__ counts as the package)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in MODULES and m != name and m != "bd"}


def _cycles() -> list[list[str]]:
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return cycles


def test_no_module_is_over_450_lines():
    long = {name: n for name, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them along their concerns): {long}"


def test_no_import_cycle_among_bd_modules():
    assert not _cycles(), "import cycles: " + "; ".join(" -> ".join(c) for c in _cycles())


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n != "bd.__main__"))
def test_every_module_imports(name):
    importlib.import_module(name)
