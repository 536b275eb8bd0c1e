"""Run Triton kernel tests compiled on CUDA, or through Triton's CPU interpreter elsewhere.

Triton reads TRITON_INTERPRET when a kernel is decorated (module import) and again on first
launch, and its own @jit helpers (tl.cdiv, tl.sum, ...) are interpreted only if triton itself
was first imported with the flag. So a kernel test module:

    KERNELS, NEEDS_SUBPROCESS = import_kernels("pagedserve.model.x", lambda m: m.INTERPRETED)
    _interpret = interpreter_fixture(NEEDS_SUBPROCESS)
    test_in_subprocess = subprocess_test(__file__, NEEDS_SUBPROCESS)

sets the flag only while it imports the kernels and while each of its tests runs (other test
modules never see it). If something imported triton earlier in this process without the flag,
the kernels cannot run here: the module's tests are skipped and `test_in_subprocess` runs the
whole file again in a fresh interpreter with the flag set.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
from types import ModuleType
from typing import Callable, Iterator

import pytest
import torch

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")


@contextlib.contextmanager
def interpreter_env() -> Iterator[None]:
    """TRITON_INTERPRET=1 for the duration (off CUDA only), then the previous value back."""
    if ON_CUDA:
        yield
        return
    prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if prev is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = prev


def triton_interpreted() -> bool:
    """Whether triton was first imported with TRITON_INTERPRET=1 (its @jit helpers interpreted)."""
    return type(sys.modules["triton.language"].standard.sum).__name__ == "InterpretedFunction"


def import_kernels(module: str, interpreted: Callable[[ModuleType], bool]) -> tuple[ModuleType | None, bool]:
    """Import the kernel module under the interpreter flag; returns (module, needs_subprocess).

    Call it at test-module import time: whether triton is already loaded, and how, is decided
    then. `interpreted(mod)` says which mode `mod` was imported in; a module imported earlier in
    this process in the other mode is reloaded. The module is None when the tests must run in a
    fresh process (triton already imported here without the flag); skips the test module if
    triton is not installed.
    """
    needs_subprocess = not ON_CUDA and "triton" in sys.modules and not triton_interpreted()
    with interpreter_env():
        pytest.importorskip("triton")
        if needs_subprocess:
            return None, True
        mod = importlib.import_module(module)
        if interpreted(mod) == ON_CUDA:  # imported earlier in this process in the other mode
            mod = importlib.reload(mod)
    return mod, False


def interpreter_fixture(needs_subprocess: bool, run_anyway: tuple[str, ...] = ()):
    """An autouse fixture: the flag set while each test runs; kernel tests skipped when they
    must run in a subprocess (except `test_in_subprocess` and the tests named in `run_anyway`)."""
    keep = ("test_in_subprocess", *run_anyway)

    @pytest.fixture(autouse=True)
    def _interpret(request):
        if needs_subprocess and request.node.originalname not in keep:
            pytest.skip("triton was imported without TRITON_INTERPRET=1; covered by test_in_subprocess")
        with interpreter_env():
            yield

    return _interpret


def subprocess_test(test_file: str, needs_subprocess: bool):
    """`test_in_subprocess`: runs `test_file` in a fresh interpreter when this process cannot."""

    def test_in_subprocess():
        if not needs_subprocess:
            pytest.skip("the kernels run in this process")
        env = dict(os.environ, TRITON_INTERPRET="1")
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]

    return test_in_subprocess
