"""Triton weight-only GEMMs (int8, AWQ int4) against the dequantized reference.

On CUDA they run compiled; elsewhere through Triton's CPU interpreter (set up by
tests/triton_interp.py: TRITON_INTERPRET=1 while the kernels are imported and run, or a fresh
interpreter process if triton was already imported without it). Shapes are tiny: the interpreter is slow.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedserve.model.awq_format import dequantize, rtn_quantize
from pagedserve.model.quantization import quantize_int8

from tests.triton_interp import DEVICE, import_kernels, interpreter_fixture, subprocess_test

TQ, _NEEDS_SUBPROCESS = import_kernels("pagedserve.model.triton_quant", lambda m: m._interpreted())
W8, _ = import_kernels("pagedserve.model.int8_w8a8",
                       lambda m: type(m._epilogue_kernel).__name__ == "InterpretedFunction")
_interpret = interpreter_fixture(_NEEDS_SUBPROCESS)
test_in_subprocess = subprocess_test(__file__, _NEEDS_SUBPROCESS)


# One ulp of each dtype: the final cast rounds to nearest on the GPU (<= half an ulp), but Triton's CPU
# interpreter truncates fp32 -> bf16 (< one ulp). fp32 gets accumulation-order slack.
_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def _check(y, ref, dtype):
    """y must equal the fp32 reference up to one rounding to `dtype` (plus fp32 accumulation order).

    The reference dequantizes exactly in fp32 (with the scales/bias already in `dtype`, as the kernel
    sees them); the kernels only ever feed exact values (int8, q - z) to the dot, so no weight rounding
    is allowed for. A wrong nibble, zero point, group or a lost K split shows up as errors of the size
    of a weight times an activation, far above this bound."""
    assert y.dtype == dtype and y.shape == ref.shape, (y.dtype, y.shape, ref.shape)
    y = y.float()
    scale = ref.abs().max().item()
    bound = _RTOL[dtype] * ref.abs() + 1e-4 * scale
    excess = ((y - ref).abs() - bound).max().item()
    err = ((y - ref).abs().max() / scale).item()
    assert excess <= 0, f"max abs error {err:.3g} of max |ref| {scale:.3g} exceeds rtol {_RTOL[dtype]:.3g} + 1e-4"


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# m: decode row (M<=16 bucket, split-K by heuristic), 20 (BLOCK_M 32), 37 (BLOCK_M 64), 70 (64x128 tiles),
# 130 (128x128 tiles, 8 warps).
@pytest.mark.parametrize("m", [1, 20, 37, 70, 130])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_gemm(m, dtype):
    g = torch.Generator().manual_seed(m)
    n, k = 72, 300  # neither a multiple of the tiles: masked N and K edges
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    q, s = quantize_int8(w)
    s, b = s.to(dtype), b.to(dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    ref = F.linear(x.float(), q.float() * s.float()[:, None])
    y = TQ.int8_linear_triton(x.to(DEVICE), q.to(DEVICE), s.to(DEVICE), b.to(DEVICE))
    _check(y.cpu(), ref + b.float(), dtype)
    y = TQ.int8_linear_triton(x.to(DEVICE).view(1, m, k), q.to(DEVICE), s.to(DEVICE))
    _check(y.cpu().view(m, n), ref, dtype)
    y = TQ.int8_linear_triton(x.to(DEVICE), q.to(DEVICE), s.to(DEVICE), b.to(DEVICE), split_k=2)
    _check(y.cpu(), ref + b.float(), dtype)


@pytest.mark.parametrize("split", [1, 2, 3])  # 3 splits of 3 K tiles: the last split is short
@pytest.mark.parametrize("bias", [False, True])
def test_int8_gemm_split_k(split, bias):
    g = torch.Generator().manual_seed(split)
    n, k, m = 40, 300, 3
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g).to(torch.bfloat16)
    q, s = quantize_int8(w)
    s = s.to(torch.bfloat16)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    ref = F.linear(x.float(), q.float() * s.float()[:, None], b.float() if bias else None)
    y = TQ.int8_linear_triton(x.to(DEVICE), q.to(DEVICE), s.to(DEVICE), b.to(DEVICE) if bias else None,
                              split_k=split)
    _check(y.cpu(), ref, torch.bfloat16)


def _awq_case(m, n, k, group, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g).to(dtype)
    qw, qz, sc = rtn_quantize(w, group)
    sc = sc.to(dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    ref = F.linear(x.float(), dequantize(qw, qz, sc))  # dequantized exactly in fp32
    return x, qw, qz, sc, b, ref


@pytest.mark.parametrize("m, group", [(1, 32), (5, 128), (20, 64), (37, 64), (70, 128), (130, 32)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_awq_gemm(m, group, dtype):
    n, k = 200, 256  # n: a multiple of 8 but not of the 64/128-wide tiles; several K tiles and groups
    x, qw, qz, sc, b, ref = _awq_case(m, n, k, group, dtype, 100 + m)
    y = TQ.awq_linear_triton(x.to(DEVICE), qw.to(DEVICE), qz.to(DEVICE), sc.to(DEVICE), b.to(DEVICE))
    _check(y.cpu(), ref + b.float(), dtype)
    y = TQ.awq_linear_triton(x.to(DEVICE).view(m, 1, k), qw.to(DEVICE), qz.to(DEVICE), sc.to(DEVICE))
    _check(y.cpu().view(m, n), ref, dtype)
    y = TQ.awq_linear_triton(x.to(DEVICE), qw.to(DEVICE), qz.to(DEVICE), sc.to(DEVICE), b.to(DEVICE), split_k=2)
    _check(y.cpu(), ref + b.float(), dtype)


@pytest.mark.parametrize("split", [1, 2, 3])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("group", [32, 64])
def test_awq_gemm_split_k(split, bias, group):
    x, qw, qz, sc, b, ref = _awq_case(4, 48, 224 if group == 32 else 192, group, torch.bfloat16, split)
    y = TQ.awq_linear_triton(x.to(DEVICE), qw.to(DEVICE), qz.to(DEVICE), sc.to(DEVICE),
                             b.to(DEVICE) if bias else None, split_k=split)
    _check(y.cpu(), ref + b.float() if bias else ref, torch.bfloat16)


def test_tile_config_buckets_and_split():
    c = TQ._config(1, 4096, 4096, 132)  # o_proj decode on an H100: 64 tiles -> split K
    assert (c.block_m, c.block_n, c.block_k) == (16, 32, 256) and c.split > 1
    assert (TQ._config(1, 4096, 4096, 132, max_k=128).block_n) == 64  # AWQ keeps 64-wide tiles
    assert c.split * TQ.triton.cdiv(TQ.triton.cdiv(4096, c.block_k), c.split) >= 4096 // c.block_k
    assert TQ._config(1, 22016, 4096, 132).split == 1  # 688 tiles already fill the GPU
    assert TQ._config(32, 4096, 4096, 132).block_m == 32
    big = TQ._config(256, 12288, 4096, 132)
    assert (big.block_m, big.block_n, big.block_k, big.split) == (128, 128, 64, 1)
    assert TQ._config(256, 4096, 4096, 132).split == 4  # 64 big tiles on 132 SMs
    assert TQ._config(1, 4096, 4096, 132, max_k=32).block_k == 32
    assert TQ._config(1, 64, 512, 132, split_k=100).split == 2  # capped by the K tiles (256 wide), none empty
    assert TQ._largest_pow2_divisor(48, 128) == 16 and TQ._largest_pow2_divisor(256, 128) == 128


def test_awq_gemm_refuses_bad_group():
    qw, qz, sc = rtn_quantize(torch.randn(8, 96), 96)
    with pytest.raises(ValueError, match="group size 96"):
        TQ.awq_linear_triton(torch.randn(1, 96, device=DEVICE), qw.to(DEVICE), qz.to(DEVICE), sc.to(DEVICE))


# -------------------------------------------------- AWQ dense path (large M): dequantize, then cuBLAS
@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_awq_dequantize_kernel(group, dtype):
    n, k = 200, 256  # n: not a multiple of the 128-wide tile; K: several 32-row tiles per group
    x, qw, qz, sc, b, ref = _awq_case(3, n, k, group, dtype, 7)
    w = TQ.awq_dequantize_triton(qw.to(DEVICE), qz.to(DEVICE), sc.to(DEVICE), dtype)
    assert w.shape == (k, n) and w.dtype == dtype
    exact = dequantize(qw, qz, sc).t()  # [K, N] fp32
    torch.testing.assert_close(w.cpu().float(), exact, rtol=_RTOL[dtype], atol=1e-6)
    y = TQ.awq_linear_dense(x.to(DEVICE), qw.to(DEVICE), qz.to(DEVICE), sc.to(DEVICE), b.to(DEVICE))
    # The weight is rounded to `dtype` before the GEMM here: allow that rounding too.
    err = ((y.cpu().float() - (ref + b.float())).abs().max() / ref.abs().max()).item()
    assert err < (1e-5 if dtype == torch.float32 else 2e-2), err


def test_dispatch_thresholds(monkeypatch):
    from pagedserve.model import quant_dispatch as qd

    assert qd.fp8_use_triton(qd.FP8_TRITON_MAX_M - 1) and not qd.fp8_use_triton(qd.FP8_TRITON_MAX_M)
    assert qd.int8_use_w8a8(qd.INT8_W8A8_FROM_M, 4096, 4096) and not qd.int8_use_w8a8(qd.INT8_W8A8_FROM_M - 1, 4096, 4096)
    assert not qd.int8_use_w8a8(4096, 4100, 4096 + 4)  # _int_mm needs N % 8 == 0
    assert not qd.int8_use_w8a8(4096, 4096, 300)  # ... and K % 8 == 0
    monkeypatch.setenv("PAGEDSERVE_INT8_W8A8_FROM_M", "0")
    assert not qd.int8_use_w8a8(16, 4096, 4096) and qd.int8_use_w8a8(17, 4096, 4096)  # and M > 16
    monkeypatch.setenv("PAGEDSERVE_FP8_TRITON_MAX_M", "8")
    assert not qd.fp8_use_triton(8)
    assert qd.dense_from_m("awq", 4096, 4096) == qd.DEFAULT_DENSE_FROM_M["awq"]
    monkeypatch.setitem(qd.DENSE_FROM_M, ("awq", 4096, 4096), 48)
    assert qd.use_dense("awq", 48, 4096, 4096) and not qd.use_dense("awq", 47, 4096, 4096)
    assert not qd.use_dense("awq", 47, 4096, 11008)  # other shapes keep the default
    monkeypatch.setenv("PAGEDSERVE_QUANT_DENSE_M", "8")
    assert qd.use_dense("awq", 8, 4096, 11008) and not qd.use_dense("awq", 7, 4096, 11008)


# -------------------------------------------------- fp8 weight-only (W8A16): the int8 kernel with e4m3 weights
@pytest.mark.parametrize("m", [1, 20, 37])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_weight_only_gemm(m, dtype):
    """The e4m3 weight converts exactly to x's dtype (fp8 -> float only, so the interpreter's fp32 -> e4m3
    carry bug cannot occur): the result equals the fp32 product of x and the dequantized weight."""
    from pagedserve.model.fp8 import FP8, fp8_linear_weight_only_reference, quantize_fp8_rows

    g = torch.Generator().manual_seed(50 + m)
    n, k = 72, 300
    w, b = torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g).to(dtype)
    q, s = quantize_fp8_rows(w)
    assert q.dtype == FP8
    x = torch.randn(m, k, generator=g).to(dtype)
    ref = F.linear(x.float(), q.float() * s[:, None]) + b.float()
    y = TQ.fp8_linear_triton(x.to(DEVICE), q.to(DEVICE), s.to(DEVICE), b.to(DEVICE))
    _check(y.cpu(), ref, dtype)
    torch.testing.assert_close(fp8_linear_weight_only_reference(x, q, s, b).float(), ref,
                               rtol=_RTOL[dtype], atol=1e-4 * ref.abs().max().item())
    y = TQ.fp8_linear_triton(x.to(DEVICE).view(1, m, k), q.to(DEVICE), s.to(DEVICE), split_k=3)
    _check(y.cpu().view(m, n), ref - b.float(), dtype)


# -------------------------------------------------- int8 W8A8 (large M): activation quant + epilogue kernels
def test_int8_per_token_quant_kernel():
    from pagedserve.model.int8_w8a8 import quantize_int8_rows_rne_away

    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 200, generator=g) * torch.logspace(-2, 2, 6).unsqueeze(1)
    x[2] = 0  # an all-zero row: scale floor, zeros out
    q, s = W8.per_token_quant_int8(x.to(DEVICE))
    rq, rs = quantize_int8_rows_rne_away(x)
    assert q.dtype == torch.int8 and s.shape == (6,)
    torch.testing.assert_close(s.cpu(), rs, rtol=1e-6, atol=0)
    diff = (q.cpu().int() - rq.int()).abs()
    assert diff.max().item() <= 1 and diff.float().mean().item() < 1e-3  # a 1-ulp division may flip a tie
    assert q.cpu().int().abs().amax(1)[[0, 1, 3, 4, 5]].eq(127).all() and q.cpu()[2].eq(0).all()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_w8a8_epilogue_and_arithmetic(bias, dtype):
    """The epilogue kernel on an int32 accumulator == the reference's fp32 scaling; and the W8A8 result is
    within activation-quantization error of the weight-only one (the GEMM itself, torch._int_mm, runs in
    tests/test_gpu.py; here torch's integer matmul stands in for it)."""
    from pagedserve.model.int8_w8a8 import int8_w8a8_reference, quantize_int8_rows_rne_away

    g = torch.Generator().manual_seed(5)
    m, n, k = 40, 72, 96
    w = torch.randn(n, k, generator=g)
    qw, sw = quantize_int8(w)
    sw = sw.to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    x = torch.randn(m, k, generator=g).to(dtype)
    qx, sx = quantize_int8_rows_rne_away(x)
    acc = qx.int() @ qw.int().t()
    y = W8.scale_epilogue(acc.to(DEVICE), sx.to(DEVICE), sw.to(DEVICE), b.to(DEVICE) if bias else None, dtype)
    ref = int8_w8a8_reference(x, qw, sw, b)
    assert y.dtype == dtype and y.shape == (m, n)
    _check(y.cpu(), ref.float(), dtype) if dtype == torch.float32 else torch.testing.assert_close(
        y.cpu().float(), ref.float(), rtol=2 ** -7, atol=1e-3)
    weight_only = F.linear(x.float(), qw.float() * sw.float()[:, None]) + (b.float() if bias else 0)
    rel = ((ref.float() - weight_only).norm() / weight_only.norm()).item()
    assert 0 < rel < 0.02, rel  # activation rounding: ~1/254 of each row's absmax per element
    if DEVICE.type == "cpu":  # torch._int_mm runs on the CPU too: the whole wrapper, minus nothing
        torch.testing.assert_close(W8.int8_w8a8_linear(x, qw, sw, b).float(), ref.float(), rtol=2 ** -7, atol=1e-3)
