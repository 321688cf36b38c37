"""The package's import graph: no module of ``adamerge_fast`` imports itself through others (module-level and
function-level imports both count: a function-local import is how a cycle hides), and the package holds no
benchmark harness."""

import ast
import pkgutil
import sys
from pathlib import Path

import adamerge_fast

PKG = adamerge_fast.__name__


def _modules() -> tuple[dict[str, tuple[Path, bool]], list[str]]:
    """``({module: (source file, is_package)}, [skipped packages])`` for every module of the package.
    ``walk_packages`` imports subpackages to list them; one that needs a missing optional dependency is skipped."""
    skipped = []

    def onerror(name):
        exc = sys.exc_info()[1]
        if not (isinstance(exc, ModuleNotFoundError) and not (exc.name or "").startswith(PKG)):
            raise exc
        skipped.append(name)

    found = {PKG: (Path(adamerge_fast.__file__), True)}
    for info in pkgutil.walk_packages(adamerge_fast.__path__, PKG + ".", onerror=onerror):
        spec = info.module_finder.find_spec(info.name)
        assert spec is not None and spec.origin, info.name
        found[info.name] = (Path(spec.origin), info.ispkg)  # a compiled extension's origin is its .so
    return found, skipped


def _imports(name: str, path: Path, is_pkg: bool, modules) -> set[str]:
    """The package modules that ``name``'s source imports anywhere in the file (``import adamerge_fast.x``,
    ``from adamerge_fast.x import y``, relative imports; ``from pkg import sub`` counts as importing ``pkg.sub``
    when ``sub`` is a module)."""
    if path.suffix != ".py":  # a compiled extension imports no package module
        return set()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = name if is_pkg else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name == PKG or a.name.startswith(PKG + "."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if not (target == PKG or target.startswith(PKG + ".")):
                continue
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
            out.update(subs)
            if len(subs) < len(node.names):
                out.add(target)
    return {m for m in out if m in modules and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component that has one (Tarjan's algorithm)."""
    index, low, on_stack, stack, comps = {}, {}, set(), [], []

    def strongconnect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    cycles = []
    for comp in comps:  # a shortest path back to the component's first module, inside the component
        start = min(comp)
        prev, frontier, end = {start: None}, [start], None
        while frontier and end is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & comp):
                    if w == start:
                        end = v
                        break
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if end is not None:
                    break
            frontier = nxt
        path = [end]
        while prev[path[-1]] is not None:
            path.append(prev[path[-1]])
        cycles.append([*reversed(path), start])
    return cycles


def _graph() -> dict[str, set[str]]:
    modules, _ = _modules()
    return {name: _imports(name, path, is_pkg, modules) for name, (path, is_pkg) in modules.items()}


def test_import_graph_is_read():
    g = _graph()
    assert {f"{PKG}.cli", f"{PKG}.models.spec", f"{PKG}.ops"} <= set(g)
    assert f"{PKG}.optim" in g[f"{PKG}.cli"]  # function-local: ``from .optim import adamerge`` in cmd_adamerge
    assert f"{PKG}.plot" in g[f"{PKG}.cli"] and f"{PKG}.plot" in g[f"{PKG}.demo"]
    assert f"{PKG}.io" in g[f"{PKG}.models.spec"]  # ``from ..io import ...``
    assert {f"{PKG}.ops", f"{PKG}.optim"} <= g[PKG]  # ``from . import ops``, ``from .optim import ...``


def test_cycle_finder_on_a_known_graph():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert sorted(_cycles(g)) == [["a", "b", "c", "a"], ["e", "e"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles among adamerge_fast modules:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_benchmark_harness_in_the_package():
    harness = [m for m in _modules()[0] if m.rpartition(".")[2].startswith("bench")]
    assert not harness, f"benchmark harness modules inside the package: {harness}"
