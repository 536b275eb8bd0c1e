"""The package's import graph (module-level and function-level imports alike, read with ast):
the engine takes part in no import cycle, and `pagedserve.distributed` never imports the engine."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "pagedserve"


def _graph() -> dict[str, set[str]]:
    mods = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        pkg = m if f.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != m and not m.startswith(t + "."):
                    graph[m].add(t)
    return graph


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for t in graph[todo.pop()]:
            if t not in seen:
                seen.add(t)
                todo.append(t)
    return seen


def test_distributed_does_not_import_the_engine():
    graph = _graph()
    bad = sorted((m, t) for m in graph if m.startswith("pagedserve.distributed")
                 for t in graph[m] if t.startswith("pagedserve.engine"))
    assert not bad


def test_no_engine_module_is_in_an_import_cycle():
    graph = _graph()
    engine = [m for m in graph if m.startswith("pagedserve.engine")]
    assert len(engine) > 5
    in_cycle = sorted(m for m in engine if m in _reaches(graph, m))
    assert not in_cycle


def test_no_module_of_the_package_is_in_an_import_cycle():
    """Cycles broken this round: distributed/executor <-> engine, model attention <-> its Triton kernels,
    fp8 <-> its Triton kernel module. Keep it that way everywhere, not only in the engine."""
    graph = _graph()
    assert not sorted(m for m in graph if m in _reaches(graph, m))
