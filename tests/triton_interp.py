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


def fp8_close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Triton's e4m3 `a` equals torch's `b`: bit for bit on the GPU; on the CPU interpreter up to one e4m3
    step, except for a known interpreter bug that is excused: triton 3.9's numpy fp32 -> e4m3 conversion
    drops the carry when rounding up into the next binade (124.3 -> 64 instead of 128), i.e. `a` is then
    exactly half of a power-of-two `b`."""
    assert a.dtype == torch.float8_e4m3fn and b.dtype == torch.float8_e4m3fn and a.shape == b.shape
    if DEVICE.type == "cuda":
        assert torch.equal(a.cpu().view(torch.uint8), b.cpu().view(torch.uint8))
        return
    af, bf = a.float().cpu(), b.float().cpu()
    step = torch.maximum(af.abs(), bf.abs()) * 2.0 ** -3 + 2.0 ** -9
    carry_bug = (af * 2 == bf) & (bf != 0) & (torch.log2(bf.abs()) == torch.log2(bf.abs()).round())
    assert ((af - bf).abs() <= step).logical_or(carry_bug).all()
    assert carry_bug.float().mean().item() < 0.1  # a bug of the conversion, not of the kernel
