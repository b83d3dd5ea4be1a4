"""The package's import graph: no circle, and layout.py imports nothing of the package.

Every ``import crabnet.x`` / ``from crabnet.x import …`` / ``from crabnet import x`` counts, also
the ones inside functions (a lazy import still ties two modules together), except those of an
``if __name__ == "__main__":`` block (they run when the module is a script, never on import). The one allowed
exception is ``crabnet/__init__.py``'s lazy ``load_model`` (``crabnet.predict``): the package
root re-exports it for ``crabnet.load_model(path)`` without importing it at start.
"""

from __future__ import annotations

import ast
from pathlib import Path

import crabnet

PACKAGE = Path(crabnet.__file__).resolve().parent
ALLOWED = {("crabnet", "crabnet.predict")}  # the lazy load_model of crabnet/__init__.py


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Package modules imported anywhere in ``path`` (a name imported from a package that is a module counts)."""
    out: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for main in [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]:
        tree.body.remove(main)  # runs as the script __main__, never on import: no edge
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
    return out


def graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in files}
    edges = {module_name(p): imports_of(p, modules) - {module_name(p)} for p in files}
    for a, b in ALLOWED:
        edges[a].discard(b)
    for name in list(edges):  # importing crabnet.x.y runs crabnet.x's __init__ first: not an edge to count
        edges[name] = {m for m in edges[name] if not (name.startswith(m + ".") and m != "crabnet")}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the path, 2 = done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = 2
        path.pop()
        return None

    for n in sorted(edges):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_package_has_no_import_circle():
    edges = graph()
    assert len(edges) > 30 and "crabnet.web.report" in edges  # the walk sees the whole package
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_layout_and_errors_import_nothing_of_the_package():
    edges = graph()
    assert edges["crabnet.layout"] == set()
    assert edges["crabnet.errors"] == set()
