"""The package's import graph (module-level and function-level imports alike, read with ast):
no import cycles, `pagedserve.distributed` and `pagedserve.model` never import the engine, and
production code never imports a test double."""
from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "pagedserve"


@functools.lru_cache(maxsize=None)
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


def test_distributed_imports_neither_the_engine_nor_the_cluster():
    graph = _graph()
    bad = sorted((m, t) for m in graph if m.startswith("pagedserve.distributed")
                 for t in graph[m] if t.startswith(("pagedserve.engine", "pagedserve.cluster")))
    assert not bad


def _imported_names(f: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
    return names


def test_no_package_code_imports_test_code():
    """Test doubles (tests/doubles: simulated backends, the mock server, fault injection) stay out of the
    package: no module of it imports `tests` or names a double's module."""
    bad = sorted(str(f.relative_to(ROOT.parent)) for f in ROOT.rglob("*.py")
                 if any(n == "tests" or n.startswith("tests.") for n in _imported_names(f)))
    assert not bad
    assert not [f for f in ROOT.rglob("*.py") if f.stem in ("sim", "mock_server", "fault_injection")]


def test_no_engine_module_is_in_an_import_cycle():
    graph = _graph()
    engine = [m for m in graph if m.startswith("pagedserve.engine")]
    assert len(engine) > 5
    in_cycle = sorted(m for m in engine if m in _reaches(graph, m))
    assert not in_cycle


def test_no_module_of_the_package_is_in_an_import_cycle():
    """Everywhere, not only in the engine (distributed/executor <-> engine, model attention <-> its Triton
    kernels and fp8 <-> its Triton kernel module are the cycles most easily made)."""
    graph = _graph()
    assert not sorted(m for m in graph if m in _reaches(graph, m))


def test_model_does_not_import_the_engine():
    """The model layer knows no scheduler: nothing under pagedserve/model/ imports pagedserve/engine/."""
    graph = _graph()
    bad = sorted((m, t) for m in graph if m.startswith("pagedserve.model")
                 for t in graph[m] if t.startswith("pagedserve.engine"))
    assert not bad


def test_the_import_rules_see_imports():
    """The scans above find a known import, so their silence means something."""
    assert "pagedserve.engine.scheduler" in _graph()["pagedserve.engine.llm_engine"]
    assert "pagedserve.engine.block_manager" in _graph()["pagedserve.engine.scheduler"]
