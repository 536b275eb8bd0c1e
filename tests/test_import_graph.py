"""The package's import graph (module-level and function-level imports alike, read with ast):
no import cycles, `pagedserve.distributed` and `pagedserve.model` never import the engine, and
production code never imports a test double."""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

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
    """Everywhere, not only in the engine."""
    graph = _graph()
    assert not sorted(m for m in graph if m in _reaches(graph, m))


@functools.lru_cache(maxsize=None)
def _package_imports() -> dict[str, set[str]]:
    """Module -> every dotted name it imports (absolute, also outside the package)."""
    out: dict[str, set[str]] = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        m = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        pkg = m if f.name == "__init__.py" else m.rsplit(".", 1)[0]
        names: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names.add(base)
                names.update(f"{base}.{a.name}" for a in node.names)
        out[m] = names
    return out


@pytest.mark.xfail(strict=True, reason="model/runner.py takes engine.scheduler.ScheduledSeq until the runner "
                                       "takes a plain batch (issue 31, part B); then drop this mark")
def test_model_does_not_import_the_engine():
    """The model layer knows no scheduler: nothing under pagedserve/model/ imports pagedserve/engine/."""
    graph = _graph()
    bad = sorted((m, t) for m in graph if m.startswith("pagedserve.model")
                 for t in graph[m] if t.startswith("pagedserve.engine"))
    assert not bad


# Test doubles: fakes and fault injectors for tests. They live outside the package (tests/) or in
# pagedserve.testing; production code never imports them.
TEST_DOUBLES = ("pagedserve.cluster.sim", "pagedserve.bench.mock_server", "pagedserve.engine.fault_injection",
                "pagedserve.testing", "tests")


@pytest.mark.xfail(strict=True, reason="engine/llm_engine.py and engine/sampling.py import engine.fault_injection "
                                       "until the test doubles leave the package (issue 31, part B); then drop "
                                       "this mark")
def test_no_package_code_imports_test_doubles():
    imports = _package_imports()
    bad = sorted((m, n) for m, names in imports.items()
                 if not any(m == d or m.startswith(d + ".") for d in TEST_DOUBLES)
                 for n in names if any(n == d or n.startswith(d + ".") for d in TEST_DOUBLES))
    assert not bad


def test_the_import_rules_see_imports():
    """The scans above find a known import, so their silence means something."""
    assert "pagedserve.engine.scheduler" in _graph()["pagedserve.engine.llm_engine"]
    assert "pagedserve.engine.block_manager" in _package_imports()["pagedserve.engine.scheduler"]
