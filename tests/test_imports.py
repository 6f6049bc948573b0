"""The shipped package's modules import one another without a cycle: each
subpackage owns what it says (kernel, scopes, daemon, observability, verify,
kubernetes, lab), and a lower layer never reaches back into a higher one.
Imports inside functions count too: a lazy import is still a dependency,
only one that hides a cycle until it runs."""

from __future__ import annotations

import ast
import os

import ksbpf

ROOT = os.path.abspath(list(ksbpf.__path__)[0])   # a namespace package: no __init__.py


def _modules() -> dict[str, str]:
    out = {}
    for root, _dirs, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def _graph(mods: dict[str, str]) -> dict[str, set[str]]:
    """module -> the ksbpf modules it imports (`from ksbpf.x import y` names
    the module ksbpf.x.y when that is one, else ksbpf.x)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "ksbpf":
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    graph[mod].add(full if full in mods else node.module)
            elif isinstance(node, ast.Import):
                graph[mod].update(a.name for a in node.names if a.name.split(".")[0] == "ksbpf")
    return {m: {d for d in deps if d in mods and d != m} for m, deps in graph.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle():
    mods = _modules()
    assert "ksbpf.observability.scrape" in mods and "ksbpf.daemon.service" in mods   # the walk found the package
    assert _cycles(_graph(mods)) == []


def test_the_check_sees_a_cycle_through_a_lazy_import():
    """The control: a lazy import that closes a circle is found."""
    graph = _graph(_modules())
    graph["ksbpf.kernel.libbpf"] = graph["ksbpf.kernel.libbpf"] | {"ksbpf.daemon.service"}
    assert any("ksbpf.kernel.libbpf" in c and "ksbpf.daemon.service" in c for c in _cycles(graph))
