"""The shape of the source, checked from its imports (ast, nothing is imported): the wire package
imports neither app, the two apps never import each other, and no module imports itself back
through others. Every import counts, also one inside a function or under TYPE_CHECKING: a lazy
import that dodges a cycle is still a cycle."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("autoglm_wire", "edge_agent", "cloud_bridge")
FORBIDDEN = {  # importer package -> packages it must never import
    "autoglm_wire": {"edge_agent", "cloud_bridge"},
    "edge_agent": {"cloud_bridge"},
    "cloud_bridge": {"edge_agent"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imported_names(tree: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """Every module name an import statement in `tree` names (`from a import b` names `a` and `a.b`)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def import_graph() -> dict[str, set[str]]:
    modules = source_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets = set(imported_names(tree, name, path.name == "__init__.py"))
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_back_through_others() -> None:
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_imports_only_what_the_layering_allows(package: str) -> None:
    bad = sorted(f"{module} -> {target}" for module, targets in import_graph().items()
                 if module.split(".")[0] == package
                 for target in targets if target.split(".")[0] in FORBIDDEN[package])
    assert bad == []


def test_the_checks_catch_a_cycle_and_a_forbidden_import(tmp_path: Path) -> None:
    graph = {"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}, "a.w": {"a.x"}}
    assert cycles(graph) == [["a.x", "a.y", "a.z"]]
    tree = ast.parse("def f():\n    from cloud_bridge.store import Registry\nfrom . import lifecycle\n")
    names = set(imported_names(tree, "autoglm_wire.protocol", is_package=False))
    assert {"cloud_bridge.store", "cloud_bridge.store.Registry", "autoglm_wire.lifecycle"} <= names
