"""The shape of the package: no import cycles, and data reaches the models only through shards.

The import graph is read from the source (ast), not from a running interpreter, so an import
inside a function counts as much as one at the top: a cycle through a function-level import
is still a cycle, it only fails later.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

STAGES = ("ingest", "shards", "pretrain", "synth", "finetune", "clusters")


def package_dirs() -> dict[str, Path]:
    """Package name -> the folder it is imported from (the core and each stage folder)."""
    names = ["medfm", *(f"medfm.{stage}" for stage in STAGES)]
    return {n: Path(importlib.util.find_spec(n).submodule_search_locations[0]) for n in names}


def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> source file."""
    found: dict[str, Path] = {}
    for pkg, folder in package_dirs().items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if (path.parent / "__init__.py").exists() or path.parent == folder:
                found.setdefault(name, path)
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except those under `if TYPE_CHECKING:`."""
    out: list[ast.Import | ast.ImportFrom] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return out


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules whose code runs when it imports what it imports."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in mods else base)
            for target in targets:
                while target and target not in mods:  # `import a.b.c` of a non-module name
                    target = target.rpartition(".")[0]
                if not target or not target.startswith("medfm"):
                    continue
                mine = set(_ancestors(mod))
                # Importing a.b.c runs a/__init__ and a/b/__init__ first, except the packages
                # the importer is already inside (their __init__ is running or has run).
                for step in [*_ancestors(target), target]:
                    if step not in mine and step != mod:
                        graph[mod].add(step)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
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
                scc = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    scc.append(top)
                    if top == node:
                        break
                if len(scc) > 1:
                    found.append(sorted(scc))
    return found


def test_the_module_walk_sees_the_whole_package():
    mods = modules()
    for name in ("medfm.cli", "medfm.shards.manifest", "medfm.ingest.readers.dicom"):
        assert name in mods
    graph = import_graph()
    # A function-level import is an edge: medfm.cli imports the demo inside a command.
    assert "medfm.demo" in graph["medfm.cli"]
    # Importing a submodule runs its packages' __init__ first.
    assert "medfm.shards" in graph["medfm.finetune.data"]


def shortest_cycle(graph: dict[str, set[str]], scc: list[str]) -> list[str]:
    """One concrete cycle through the component's first module (breadth-first), to name it."""
    start, members = scc[0], set(scc)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(graph[node] & members):
            if child == start:
                return [*paths[node], start]
            if child not in paths:
                paths[child] = [*paths[node], child]
                queue.append(child)
    return scc


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycles():
    graph = import_graph()
    found = [" -> ".join(shortest_cycle(graph, scc)) for scc in cycles(graph)]
    assert not found, "import cycles (one path each):\n" + "\n".join(found)


def test_consumers_read_data_only_through_shards():
    """pretrain, synth and finetune never import ingest: data reaches them as shard sets."""
    graph = import_graph()
    for mod, deps in graph.items():
        if mod.startswith(("medfm.pretrain", "medfm.synth", "medfm.finetune", "medfm.models")):
            bad = sorted(d for d in deps if d.startswith("medfm.ingest"))
            assert not bad, f"{mod} imports {bad}"
