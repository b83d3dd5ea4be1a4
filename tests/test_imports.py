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


# The wings, bottom to top. A module may import its own wing and the wings it lists; the root package
# ``crabnet`` (its version and the lazy load_model above) belongs to the foundation.
STEPS = ("oxidation", "embeddings", "correlation", "stats", "predict")  # the per-step modules at the top level
MAY_IMPORT = {
    "foundation": set(),
    "jobs": {"foundation"},
    "training": {"foundation", "jobs"},
    "steps": {"foundation", "jobs", "training"},
    "explain": {"foundation", "jobs", "training", "steps"},
    "maps": {"foundation", "jobs", "training", "steps"},
    "web": {"foundation", "jobs", "training", "steps", "explain"},
}


def wing(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in MAY_IMPORT:
        return parts[1]
    return "steps" if len(parts) > 1 and parts[1] in STEPS else "foundation"


def against_order(edges: dict[str, set[str]]) -> list[str]:
    return [f"{a} -> {b}" for a, bs in edges.items() for b in bs if wing(b) not in MAY_IMPORT[wing(a)] | {wing(a)}]


def test_wings_import_only_the_wings_below_them():
    edges = graph()
    assert {wing(m) for m in edges} == set(MAY_IMPORT)  # every wing is a folder of the package, and has modules
    wrong = against_order(edges)
    assert wrong == [], "imports against the wings' order:\n" + "\n".join(wrong)
    # the check itself: an arrow up (jobs -> training) and one across (maps -> explain) are caught
    assert against_order({"crabnet.jobs.engine": {"crabnet.training.model", "crabnet.utils"}}) == [
        "crabnet.jobs.engine -> crabnet.training.model"
    ]
    assert against_order({"crabnet.maps.steps": {"crabnet.explain.store", "crabnet.oxidation"}}) == [
        "crabnet.maps.steps -> crabnet.explain.store"
    ]


def test_the_jobs_wing_imports_no_other_wing():
    edges = graph()
    jobs = {m: t for m, t in edges.items() if wing(m) == "jobs"}
    assert jobs and all(wing(b) in ("jobs", "foundation") for t in jobs.values() for b in t), jobs
