"""No import cycle among llmtrain's modules, counting every import: module-level ones and the late
ones inside functions (a late import that only dodges a cycle at import time still ties the two
modules together both ways).

The graph is read from the source (ast), not by importing: module A -> B when A imports B, or a
name from B, or a package B; importing llmtrain.x.y also runs llmtrain/x/__init__.py, so A also
points at every package above B that is not one of A's own (A's own packages are already loaded
when A runs). Run it by hand to see the graph's size and any cycle:

    python tests/unit/test_import_cycles.py
"""
from __future__ import annotations

import ast
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = "llmtrain"


def module_files(root: str = REPO) -> dict[str, str]:
    """{"llmtrain.data.splits": path, "llmtrain.data": .../data/__init__.py, ...}"""
    out = {}
    for folder, _, files in os.walk(os.path.join(root, PACKAGE)):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), root)[:-3].split(os.sep)
                out[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = os.path.join(folder, f)
    return out


def _imported(mod: str, path: str, modules: dict[str, str]) -> set[str]:
    """The llmtrain modules `mod` imports (absolute names), module-level and late."""
    is_pkg = path.endswith("__init__.py")
    here = mod.split(".") if is_pkg else mod.split(".")[:-1]  # the package a relative import starts from
    targets: set[str] = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
            for a in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{base}.{a.name}"
                targets.add(sub if sub in modules else base)
    out = set()
    own = {".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 1)}
    for t in targets:
        if not (t == PACKAGE or t.startswith(PACKAGE + ".")):
            continue
        while t not in modules and "." in t:  # `import llmtrain.x.name`-style: the module that holds it
            t = t.rsplit(".", 1)[0]
        parts = t.split(".")
        out.update(p for p in (".".join(parts[:i]) for i in range(2, len(parts) + 1)) if p not in own)
    out.discard(mod)
    return out


def import_graph(root: str = REPO) -> dict[str, set[str]]:
    modules = module_files(root)
    return {m: _imported(m, p, modules) for m, p in sorted(modules.items())}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected component with more than one module (Tarjan), as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def describe(comp: list[str], graph: dict[str, set[str]]) -> str:
    inside = set(comp)
    edges = [f"{a} -> {b}" for a in comp for b in sorted(graph[a] & inside)]
    return f"cycle among {', '.join(comp)}: " + "; ".join(edges)


def test_the_cycle_finder_sees_a_two_module_cycle_and_a_package_facade_cycle(tmp_path):
    # the checker itself, on a hand-made package: a <-> b is a cycle; c -> d.e, where d/__init__ imports c, is one too
    pkg = tmp_path / PACKAGE
    (pkg / "d").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n")  # late import: still a cycle
    (pkg / "c.py").write_text("from .d.e import y\n")
    (pkg / "d" / "__init__.py").write_text("from ..c import z\n")
    (pkg / "d" / "e.py").write_text("import os\n")
    (pkg / "f.py").write_text("from .d import e\n")  # no cycle: f -> d, d.e
    found = cycles(import_graph(str(tmp_path)))
    assert sorted(found) == [[f"{PACKAGE}.a", f"{PACKAGE}.b"], [f"{PACKAGE}.c", f"{PACKAGE}.d"]]


def test_no_import_cycle_among_llmtrain_modules():
    graph = import_graph()
    assert len(graph) > 50  # the whole package was read
    found = cycles(graph)
    assert not found, "\n".join(describe(c, graph) for c in found)


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """llmtrain.data.x -> llmtrain.train.y becomes data -> train (edges inside a package dropped)."""
    top = lambda m: m.split(".")[1] if "." in m else m  # noqa: E731
    out: dict[str, set[str]] = {}
    for a, targets in graph.items():
        out.setdefault(top(a), set()).update(top(b) for b in targets if top(b) != top(a))
    return out


def test_no_import_cycle_among_llmtrain_packages():
    """The packages are layers (README, Layout): config below distributed below data ... below cli."""
    graph = package_graph(import_graph())
    found = cycles(graph)
    assert not found, "\n".join(describe(c, graph) for c in found)


if __name__ == "__main__":
    g = import_graph()
    found = cycles(g)
    found += cycles(package_graph(g))
    for c in found:
        print(describe(c, g if c[0] in g else package_graph(g)))
    print(f"{len(g)} modules, {sum(map(len, g.values()))} import edges (module-level and late), "
          f"{len(package_graph(g))} packages: {len(found) or 'no'} import cycle{'s' if len(found) != 1 else ''}")
    sys.exit(1 if found else 0)
