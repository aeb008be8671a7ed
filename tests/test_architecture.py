"""The layer rules of docs/architecture.md, checked by import-linter on every test run, and the house's shape."""

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    r = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Contracts: 5 kept, 0 broken." in r.stdout  # every contract of pyproject.toml was checked


def test_no_import_circle():
    """Tarjan over the package's module graph (imports inside functions included): no strongly connected
    component of more than one module."""
    graph = grimp.build_graph("trustcase")
    modules = sorted(m for m in graph.modules if m.startswith("trustcase"))
    # a package's __init__ re-exporting its own modules is not a circle between layers
    edges = {m: {d for d in graph.find_modules_directly_imported_by(m)
                 if d.startswith("trustcase") and not m.startswith(d + ".")} for m in modules}
    index, low, stack, on, circles = {}, {}, [], set(), []
    sys.setrecursionlimit(10_000)

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in modules:
        if v not in index:
            visit(v)
    assert circles == []


def test_every_check_lives_at_its_plan_name():
    from trustcase.checks import REGISTRY

    for name in REGISTRY:
        cls = REGISTRY[name]
        assert cls.__module__ == f"trustcase.checks.{name}", (name, cls.__module__)
        assert (ROOT / "trustcase" / "checks" / f"{name}.py").is_file()
