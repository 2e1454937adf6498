"""The package layout of DESIGN.md holds: data flows one way, algorithms do not import the engine,
nothing but the CLI imports the pipeline, and no import cycle exists.

The import graph is built from the source with ``ast`` (no module is imported): every ``import``
and ``from ... import`` anywhere in a file - at the top, inside functions (lazy imports) and under
``TYPE_CHECKING`` - is an edge from that module to the most specific ``dist_fair`` module it
names (``from dist_fair.fair import assign`` -> ``dist_fair.fair.assign`` when that is a module,
else the package ``dist_fair.fair``).
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "dist_fair"

#: packages holding algorithms (pure, engine-agnostic): they must not import the training engine
ALGORITHM_PACKAGES = ("losses", "fair", "models", "eval", "cluster")


def module_files() -> dict[str, Path]:
    """``dist_fair.x.y`` -> its source file (packages by their ``__init__.py``)."""
    modules = {}
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of the dotted ``name`` that is a dist_fair module."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """``(imported dist_fair module, line)`` for every import statement in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name, modules)
                if target is not None:
                    found.append((target, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package of this module, level - 1 packages up
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not source.startswith("dist_fair"):
                continue
            for alias in node.names:
                target = _resolve(f"{source}.{alias.name}", modules) or _resolve(source, modules)
                if target is not None:
                    found.append((target, node.lineno))
    return found


def import_graph() -> dict[str, list[tuple[str, int]]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def import_cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself
    (Tarjan's algorithm, iterative)."""
    edges = {m: sorted({t for t, _ in targets}) for m, targets in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, child = work.pop()
            if child == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            successors = edges.get(node, [])
            if child < len(successors):
                work.append((node, child + 1))
                nxt = successors[child]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in edges.get(node, []):
                    components.append(sorted(component))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return components


def _describe_cycle(component: list[str], graph: dict[str, list[tuple[str, int]]]) -> str:
    members = set(component)
    lines = [f"  {m} -> {t} (line {line})" for m in component for t, line in graph[m] if t in members]
    return "cycle among " + ", ".join(component) + ":\n" + "\n".join(sorted(set(lines)))


def _in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_graph_builder_sees_every_kind_of_import(tmp_path):
    """The builder itself: absolute, from-package, relative, lazy and TYPE_CHECKING imports."""
    modules = {"dist_fair": Path("x"), "dist_fair.a": Path("x"), "dist_fair.a.b": Path("x"),
               "dist_fair.c": Path("x")}
    source = tmp_path / "b.py"
    source.write_text("from typing import TYPE_CHECKING\nimport numpy\nimport dist_fair.c\n"
                      "from dist_fair.a import b\nfrom . import b as again\nfrom .. import c\n"
                      "if TYPE_CHECKING:\n    from dist_fair.c import Thing\n"
                      "def f():\n    from dist_fair.a.b import g\n", encoding="utf-8")
    found = sorted(imports_of("dist_fair.a.b", source, modules), key=lambda edge: edge[1])
    assert found == [("dist_fair.c", 3), ("dist_fair.a.b", 4), ("dist_fair.a.b", 5), ("dist_fair.c", 6),
                     ("dist_fair.c", 8), ("dist_fair.a.b", 10)]
    graph = {"dist_fair.a": [("dist_fair.a.b", 1)], "dist_fair.a.b": [("dist_fair.c", 1)],
             "dist_fair.c": [("dist_fair.a", 1)], "dist_fair": []}
    assert import_cycles(graph) == [["dist_fair.a", "dist_fair.a.b", "dist_fair.c"]]
    assert import_cycles({"dist_fair.a": [("dist_fair.c", 1)], "dist_fair.c": []}) == []


def test_no_import_cycle():
    graph = import_graph()
    cycles = import_cycles(graph)
    assert not cycles, "\n".join(_describe_cycle(c, graph) for c in cycles)


def _package_of(module: str) -> str:
    """``dist_fair.fair.assign`` -> ``dist_fair.fair``; top-level modules (``dist_fair.config``) are their own."""
    return ".".join(module.split(".")[:2])


def test_no_import_cycle_between_packages():
    """Data flows one way (DESIGN.md): the packages (and bottom-floor modules) form no cycle either,
    e.g. the engine may use the models' registry or the models the engine, not both."""
    graph = import_graph()
    package_graph: dict[str, list[tuple[str, int]]] = {}
    why: dict[tuple[str, str], list[str]] = {}
    for module, targets in graph.items():
        source = _package_of(module)
        package_graph.setdefault(source, [])
        for target, line in targets:
            if _package_of(target) != source:
                package_graph[source].append((_package_of(target), line))
                why.setdefault((source, _package_of(target)), []).append(f"{module} -> {target} (line {line})")
    cycles = import_cycles(package_graph)
    report = []
    for component in cycles:
        report.append("packages " + ", ".join(component) + " import each other; shortest cycles:")
        for path in _shortest_cycles(component, package_graph):
            report.append("  " + " -> ".join(path) + ":")
            report += [f"    {edge}" for a, b in zip(path, path[1:]) for edge in sorted(set(why[(a, b)]))]
    assert not cycles, "\n".join(report)


def _shortest_cycles(component: list[str], graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """For every member, the shortest cycle through it (breadth-first search), each cycle once."""
    members = set(component)
    found: dict[frozenset, list[str]] = {}
    for start in component:
        parent = {start: None}
        queue = [start]
        path = None
        while queue and path is None:
            node = queue.pop(0)
            for nxt in sorted({t for t, _ in graph[node] if t in members}):
                if nxt == start:
                    path = [start, *reversed(_walk_back(parent, node)), start]
                    break
                if nxt not in parent:
                    parent[nxt] = node
                    queue.append(nxt)
        if path is not None:
            found.setdefault(frozenset(zip(path, path[1:])), path)
    return list(found.values())


def _walk_back(parent: dict[str, str | None], node: str) -> list[str]:
    """``node`` and its ancestors up to (excluding) the search root."""
    chain = []
    while parent[node] is not None:
        chain.append(node)
        node = parent[node]
    return chain


def test_algorithms_do_not_import_the_training_engine():
    """losses, fair, models, eval and cluster reach other workers through dist_fair.collective only."""
    bad = [f"{module} imports {target} (line {line})"
           for module, targets in import_graph().items()
           if any(_in_package(module, f"dist_fair.{p}") for p in ALGORITHM_PACKAGES)
           for target, line in targets if _in_package(target, "dist_fair.train")]
    assert not bad, "algorithm modules import the training engine:\n" + "\n".join(bad)


def test_only_the_cli_imports_the_pipeline():
    def is_pipeline(module: str) -> bool:
        return _in_package(module, "dist_fair.pipeline") or _in_package(module, "dist_fair.pipeline_cli")

    bad = [f"{module} imports {target} (line {line})"
           for module, targets in import_graph().items()
           if not (module == "dist_fair.cli" or is_pipeline(module))
           for target, line in targets if is_pipeline(target)]
    assert not bad, "only dist_fair/cli.py may import the pipeline:\n" + "\n".join(bad)


def test_collective_protocol_is_at_the_bottom():
    """dist_fair.collective imports nothing of dist_fair but the errors (it is the bottom floor)."""
    targets = {t for t, _ in import_graph()["dist_fair.collective"]}
    assert targets <= {"dist_fair.errors"}, targets
