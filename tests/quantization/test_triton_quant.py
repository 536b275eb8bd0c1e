"""Triton AWQ int4 GEMM (K-strided layout) against the dequantized reference (int8/fp8: tests/quantization/test_triton_w8a8.py).

On CUDA they run compiled; elsewhere through Triton's CPU interpreter (set up by
tests/triton_interp.py: TRITON_INTERPRET=1 while the kernels are imported and run, or a fresh
interpreter process if triton was already imported without it). Shapes are tiny: the interpreter is slow.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedserve.quantization.awq_format import dequantize, rtn_quantize

from tests.triton_interp import DEVICE, import_kernels, interpreter_fixture, subprocess_test

TQ, _NEEDS_SUBPROCESS = import_kernels("pagedserve.quantization.triton_quant", lambda m: m._interpreted())
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


def _awq_case(m, n, k, group, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g).to(dtype)
    qw, qz, sc = rtn_quantize(w, group)
    sc = sc.to(dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    ref = F.linear(x.float(), dequantize(qw, qz, sc))  # dequantized exactly in fp32
    return x, qw, qz, sc, b, ref


def _kstrided(qw, qz):
    from pagedserve.quantization.awq_format import to_kstrided

    a, z = to_kstrided(qw, qz)
    return a.to(DEVICE), z.to(DEVICE)


def test_kstrided_layout_round_trip():
    from pagedserve.quantization.awq_format import dequantize_kstrided, to_kstrided

    _, qw, qz, sc, _, _ = _awq_case(1, 40, 384, 64, torch.float32, 3)
    a, z = to_kstrided(qw, qz)
    assert a.shape == (40, 48) and a.dtype == torch.int32 and z.shape == (6, 40) and z.dtype == torch.uint8
    assert torch.equal(dequantize_kstrided(a, z, sc), dequantize(qw, qz, sc))
    with pytest.raises(ValueError, match="% 128"):
        to_kstrided(*rtn_quantize(torch.randn(8, 96), 32)[:2])


# groups spanning whole 128-row blocks (one scale a block: 128, 256), smaller ones (a scale per 16, 32 or
# 64 rows of a block) and one that is not a power of two (192: a block's halves take different groups)
@pytest.mark.parametrize("m, group", [(1, 128), (5, 32), (20, 64), (37, 256), (70, 128), (3, 16), (4, 192)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_awq_gemm(m, group, dtype):
    n, k = 200, 768  # n: a multiple of 8 but not of the 64-wide tile; six 128-row K blocks
    x, qw, qz, sc, b, ref = _awq_case(m, n, k, group, dtype, 100 + m)
    a, z = _kstrided(qw, qz)
    y = TQ.awq_linear(x.to(DEVICE), a, z, sc.to(DEVICE), b.to(DEVICE))
    _check(y.cpu(), ref + b.float(), dtype)
    y = TQ.awq_linear(x.to(DEVICE).view(m, 1, k), a, z, sc.to(DEVICE))
    _check(y.cpu().view(m, n), ref, dtype)


@pytest.mark.parametrize("split", [1, 2, 3, 6])
@pytest.mark.parametrize("bias", [False, True])
def test_awq_gemm_split_k(split, bias):
    """K split into partials that the last split of each tile sums (and re-arms its counter)."""
    x, qw, qz, sc, b, ref = _awq_case(4, 48, 768, 64, torch.bfloat16, split)
    a, z = _kstrided(qw, qz)
    cfg = TQ.TileConfig(16, 64, 128, split, 4, 3)
    y = TQ.awq_linear(x.to(DEVICE), a, z, sc.to(DEVICE), b.to(DEVICE) if bias else None, cfg=cfg)
    _check(y.cpu(), ref + b.float() if bias else ref, torch.bfloat16)
    assert TQ.tile_locks(y.device).eq(0).all()


def test_tile_config_buckets_and_split():
    c = TQ.awq_config(1, 3584, 3584, 132)  # o_proj decode on an H200: 28 tiles -> K split toward ~8 per SM
    assert (c.block_m, c.block_n, c.block_k, c.split) == (16, 128, 128, 14)
    assert c.split * TQ.triton.cdiv(3584 // 128, c.split) >= 3584 // 128  # no split is left empty
    assert TQ.awq_config(1, 37888, 3584, 132).split == 4  # gate_up: 296 tiles, 4 splits (the sweep's best)
    c = TQ.awq_config(64, 37888, 3584, 132)  # 64-row tiles: ~2 programs per SM, at least 2 splits, 8 warps
    assert (c.split, c.num_warps) == (2, 8) and TQ.awq_config(64, 4608, 3584, 132).split == 7
    assert TQ.awq_config(32, 37888, 3584, 132).split == 4  # 32-row tiles: at least 4 splits (the sweep)
    assert TQ.awq_config(32, 3584, 3584, 132).split == 7  # ~2 per SM: 9 asked, 7 whole ranges of 4 K blocks
    assert TQ.awq_config(32, 4608, 3584, 132).block_m == 32 and TQ.awq_config(33, 4608, 3584, 132).block_m == 64
    assert TQ.awq_warm_up_sizes(127) == [1, 16, 17, 32, 33, 127]


def test_awq_gemm_refuses_other_layouts():
    qw, qz, sc = rtn_quantize(torch.randn(8, 256), 128)
    with pytest.raises(ValueError, match="K-strided"):  # the checkpoint's own packing
        TQ.awq_linear(torch.randn(1, 256, device=DEVICE), qw.to(DEVICE), qz.to(DEVICE), sc.to(DEVICE))


# -------------------------------------------------- AWQ dense path (large M): dequantize, then cuBLAS
@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_awq_dequantize_kernel(group, dtype):
    n, k = 200, 256  # n: not a multiple of the 64-row tile
    x, qw, qz, sc, b, ref = _awq_case(3, n, k, group, dtype, 7)
    a, z = _kstrided(qw, qz)
    w = TQ.awq_dequantize(a, z, sc.to(DEVICE), dtype)
    assert w.shape == (n, k) and w.dtype == dtype
    torch.testing.assert_close(w.cpu().float(), dequantize(qw, qz, sc), rtol=_RTOL[dtype], atol=1e-6)
    y = TQ.awq_linear_dense(x.to(DEVICE), a, z, sc.to(DEVICE), b.to(DEVICE))
    # The weight is rounded to `dtype` before the GEMM here: allow that rounding too.
    err = ((y.cpu().float() - (ref + b.float())).abs().max() / ref.abs().max()).item()
    assert err < (1e-5 if dtype == torch.float32 else 2e-2), err


def test_dispatch_thresholds(monkeypatch):
    from pagedserve.quantization import dispatch as qd

    lo, hi = qd.FP8_SCALED_MM_M
    assert qd.fp8_use_scaled_mm(lo, 4096, 4096) and not qd.fp8_use_scaled_mm(lo - 1, 4096, 4096)
    assert qd.fp8_use_scaled_mm(hi - 1, 4096, 4096) and not qd.fp8_use_scaled_mm(hi, 4096, 4096)
    assert not qd.fp8_use_scaled_mm(lo, 4100, 4096) and not qd.fp8_use_scaled_mm(lo, 4096, 4104)  # % 16
    monkeypatch.setenv("PAGEDSERVE_FP8_SCALED_MM_M", "0,0")
    assert not qd.fp8_use_scaled_mm(lo, 4096, 4096)
    monkeypatch.setenv("PAGEDSERVE_FP8_SCALED_MM_M", "0,1000000000")
    assert qd.fp8_use_scaled_mm(1, 4096, 4096) and qd.fp8_use_scaled_mm(100000, 4096, 4096)
    assert qd.dense_from_m("awq", 4096, 4096) == qd.DEFAULT_DENSE_FROM_M["awq"]
    monkeypatch.setitem(qd.DENSE_FROM_M, ("awq", 4096, 4096), 48)
    assert qd.use_dense("awq", 48, 4096, 4096) and not qd.use_dense("awq", 47, 4096, 4096)
    assert not qd.use_dense("awq", 47, 4096, 11008)  # other shapes keep the default
    monkeypatch.setenv("PAGEDSERVE_QUANT_DENSE_M", "8")
    assert qd.use_dense("awq", 8, 4096, 11008) and not qd.use_dense("awq", 7, 4096, 11008)
