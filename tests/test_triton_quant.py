"""Triton weight-only GEMMs (int8, AWQ int4) against the dequantized reference.

On CUDA they run compiled; elsewhere through Triton's CPU interpreter (the same set-up as
test_triton_attention.py: TRITON_INTERPRET=1 while the kernels are imported and run, or a fresh
interpreter process if triton was already imported without it). Shapes are tiny: the interpreter is slow.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pagedserve.model.awq_format import dequantize, rtn_quantize
from pagedserve.model.quantization import quantize_int8

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")


@contextlib.contextmanager
def _interpreter_env():
    if ON_CUDA:
        yield
        return
    prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if prev is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = prev


def _triton_interpreted() -> bool:
    return type(sys.modules["triton.language"].standard.sum).__name__ == "InterpretedFunction"


_NEEDS_SUBPROCESS = not ON_CUDA and "triton" in sys.modules and not _triton_interpreted()

with _interpreter_env():
    pytest.importorskip("triton")
    if not _NEEDS_SUBPROCESS:
        import pagedserve.model.triton_quant as TQ

        if TQ._interpreted() == ON_CUDA:  # imported earlier in this process in the other mode
            TQ = importlib.reload(TQ)


@pytest.fixture(autouse=True)
def _interpret(request):
    if _NEEDS_SUBPROCESS and request.node.originalname != "test_in_subprocess":
        pytest.skip("triton was imported without TRITON_INTERPRET=1; covered by test_in_subprocess")
    with _interpreter_env():
        yield


def test_in_subprocess():
    if not _NEEDS_SUBPROCESS:
        pytest.skip("the kernels run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]


def _check(y, ref, dtype):
    assert y.dtype == dtype and y.shape == ref.shape
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    err = ((y.float() - ref).abs() / (ref.abs() + 1)).max().item()
    assert err <= tol, f"max relative error {err} > {tol}"


@pytest.mark.parametrize("m", [1, 5, 37])  # decode row, small batch, more rows than one tile
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_gemm(m, dtype):
    g = torch.Generator().manual_seed(m)
    n, k = 72, 80  # neither a multiple of the 64-wide tiles: masked edges
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    q, s = quantize_int8(w)
    x = torch.randn(m, k, generator=g).to(dtype)
    ref = F.linear(x.float(), q.float() * s[:, None], b)
    y = TQ.int8_linear_triton(x.to(DEVICE), q.to(DEVICE), s.to(dtype).to(DEVICE), b.to(dtype).to(DEVICE))
    _check(y.cpu(), ref, dtype)
    y = TQ.int8_linear_triton(x.to(DEVICE).view(1, m, k), q.to(DEVICE), s.to(dtype).to(DEVICE))
    _check(y.cpu().view(m, n), ref - b, dtype)


@pytest.mark.parametrize("m, group", [(1, 32), (5, 128), (37, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_awq_gemm(m, group, dtype):
    g = torch.Generator().manual_seed(100 + m)
    n, k = 40, 256  # n: not a multiple of the tile; several K tiles and groups
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    qw, qz, sc = rtn_quantize(w, group)
    x = torch.randn(m, k, generator=g).to(dtype)
    ref = F.linear(x.float(), dequantize(qw, qz, sc.to(dtype)), b)
    y = TQ.awq_linear_triton(x.to(DEVICE), qw.to(DEVICE), qz.to(DEVICE), sc.to(dtype).to(DEVICE),
                             b.to(dtype).to(DEVICE))
    _check(y.cpu(), ref, dtype)


def test_awq_gemm_refuses_bad_group():
    qw, qz, sc = rtn_quantize(torch.randn(8, 96), 96)
    with pytest.raises(ValueError, match="group size 96"):
        TQ.awq_linear_triton(torch.randn(1, 96, device=DEVICE), qw.to(DEVICE), qz.to(DEVICE), sc.to(DEVICE))
