"""The 8-bit GEMM that serves fp8 and int8 linears on CUDA: per-token activation quant, then the W8A8 Triton
GEMM (8-bit dot, both scales and the bias in its epilogue).

Compiled on CUDA; through Triton's CPU interpreter elsewhere (tests/triton_interp.py). Shapes are tiny and
chosen so the tails are exercised: N not a multiple of the N tile (wrapped channels dropped at the store),
M not a multiple of the M tile, K a multiple of 16 but not of the default K step (the wrapper
shrinks it), and K split into partials that the last split of each tile sums.
"""
from __future__ import annotations

import pytest
import torch

from pagedserve.quantization.fp8 import FP8, fp8_linear_reference, quantize_fp8_rows
from pagedserve.quantization.int8_w8a8 import int8_w8a8_reference, quantize_int8_rows_rne_away
from pagedserve.quantization.methods import quantize_int8

from tests.triton_interp import DEVICE, fp8_close, import_kernels, interpreter_fixture, subprocess_test

TQ, _NEEDS_SUBPROCESS = import_kernels("pagedserve.quantization.triton_quant", lambda m: m._interpreted())
WA, _ = import_kernels("pagedserve.quantization.triton_w8a8",
                       lambda m: type(m._w8a8_kernel).__name__ == "InterpretedFunction")
_interpret = interpreter_fixture(_NEEDS_SUBPROCESS)
test_in_subprocess = subprocess_test(__file__, _NEEDS_SUBPROCESS)

_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def _close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """y equals the fp32 reference up to one rounding to `dtype` plus fp32 accumulation order. A wrong row,
    channel, scale, K tile or split shows up as an error the size of a whole product, far above this."""
    assert y.dtype == dtype and y.shape == ref.shape, (y.dtype, y.shape, ref.shape)
    y, ref = y.cpu().float(), ref.float()
    scale = ref.abs().max().item()
    excess = ((y - ref).abs() - (_RTOL[dtype] * ref.abs() + 1e-4 * scale)).max().item()
    assert excess <= 0, f"max abs error {((y - ref).abs().max() / scale).item():.3g} of max |ref| {scale:.3g}"


def _case(m, n, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    b = torch.randn(n, generator=g).to(dtype)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-1, 1, m).unsqueeze(1)).to(dtype)
    return x, w, b


@pytest.mark.parametrize("kind", ["fp8", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_token_quant_both_dtypes(kind, dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(7, 200, generator=g) * torch.logspace(-2, 2, 7).unsqueeze(1)).to(dtype)
    x[3] = 0  # an all-zero row: the scale floor, zeros out
    q, s = WA.per_token_quant(x.to(DEVICE), FP8 if kind == "fp8" else torch.int8)
    rq, rs = quantize_fp8_rows(x) if kind == "fp8" else quantize_int8_rows_rne_away(x)
    assert s.shape == (7, 1) and s.dtype == torch.float32
    torch.testing.assert_close(s.cpu().squeeze(1), rs, rtol=1e-6, atol=0)
    top = 448.0 if kind == "fp8" else 127.0
    assert q.cpu().float().abs().amax(1)[[0, 1, 2, 4, 5, 6]].eq(top).all() and q.cpu()[3].float().eq(0).all()
    if kind == "int8":
        diff = (q.cpu().int() - rq.int()).abs()
        assert q.dtype == torch.int8 and diff.max().item() <= 1 and diff.float().mean().item() < 1e-3
    else:
        fp8_close(q, rq)


# m: 1 (M tile 16, K split), 20 and 37 (M tile 64, split), 70 (64 x 128 tiles), 130 (128 x 128, 8 warps)
@pytest.mark.parametrize("m", [1, 20, 70, 130])
@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_w8a8_gemm_matches_reference(m, kind):
    """The whole W8A8 linear against the reference arithmetic of the same scheme. The kernel's own
    activation quant is checked above; here the GEMM gets the reference's quantized operands so the
    comparison is of the GEMM and its epilogue alone, then the full wrapper is checked loosely."""
    dtype = torch.bfloat16
    n, k = 72, 96
    x, w, b = _case(m, n, k, dtype, 10 + m)
    if kind == "fp8":
        qw, sw = quantize_fp8_rows(w)
        qx, sx = quantize_fp8_rows(x)
        ref = fp8_linear_reference(x.float(), qw, sw, b)
    else:
        qw, sw = quantize_int8(w)
        sw = sw.float()
        qx, sx = quantize_int8_rows_rne_away(x)
        ref = int8_w8a8_reference(x.float(), qw, sw, b)
    d = DEVICE
    y = WA.w8a8_gemm(qx.to(d), sx.view(-1, 1).to(d), qw.to(d), sw.to(d), b.to(d), dtype)
    _close(y, ref, dtype)
    for split, swap in ((2, False), (3, False), (1, True), (3, True)):  # split 3: one K tile of 32 each
        cfg = WA._gemm_config(m, n, k, 8)
        cfg = type(cfg)(cfg.block_m, cfg.block_n, 32, split, cfg.num_warps, cfg.num_stages, swap)
        y = WA.w8a8_gemm(qx.to(d), sx.view(-1, 1).to(d), qw.to(d), sw.to(d), None, dtype, cfg)
        _close(y, ref - b.float(), dtype)
        assert TQ.tile_locks(y.device).eq(0).all()  # the last split re-armed every tile's counter
    full = WA.w8a8_linear(x.to(d).view(1, m, k), qw.to(d), sw.to(d), b.to(d))
    assert full.shape == (1, m, n) and full.dtype == dtype
    if kind == "int8" or DEVICE.type == "cuda":  # the interpreter's e4m3 cast has a carry bug (fp8_close)
        rel = ((full.cpu().float().view(m, n) - ref).norm() / ref.norm()).item()
        assert rel < 0.01, rel


def test_w8a8_refuses_k_not_multiple_of_16():
    q = torch.zeros(4, 40, dtype=torch.int8)
    with pytest.raises(ValueError, match="K % 16"):
        WA.w8a8_gemm(q, torch.ones(4, 1), torch.zeros(8, 40, dtype=torch.int8), torch.ones(8), None, torch.float32)


def test_gemm_config_k_step_divides_k_and_splits_small_outputs():
    c = WA._gemm_config(1, 3584, 18944, 132)  # down_proj decode: 56 tiles of 64 -> split K
    assert 18944 % c.block_k == 0 and c.split == 2 and c.swap_ab
    c = WA._gemm_config(16, 4608, 3584, 132)  # qkv decode: 14 K steps of 256, too short to split
    assert (c.block_m, c.block_n, c.split, c.swap_ab) == (16, 64, 1, True)
    assert WA._gemm_config(32, 4608, 3584, 132).block_m == 32 and not WA._gemm_config(33, 4608, 3584, 132).swap_ab
    c = WA._gemm_config(512, 37888, 3584, 132)
    assert (c.block_m, c.split) == (128, 1) and 3584 % c.block_k == 0
    assert WA._gemm_config(2048, 4608, 3584, 132, "int8").block_m == 256  # per-kind tables
    assert WA._gemm_config(2048, 4608, 3584, 132, "fp8").block_n == 256


def test_gemm_config_small_m_tiles_by_shape_and_shared_memory():
    """Decode-sized M: 64-wide swapped tiles with a 6-deep pipeline, except for a projection with many
    output tiles (gate_up's 37888 channels: 592 tiles of 64 on 132 SMs), which takes the 256-wide tiles.
    A GPU with less shared memory than Hopper (Ada: 99 KiB) gets fewer stages, never a launch that
    cannot fit."""
    c = WA._gemm_config(1, 4608, 3584, 132)
    assert (c.block_m, c.block_n, c.block_k, c.num_stages, c.swap_ab) == (16, 64, 256, 6, True)
    c = WA._gemm_config(1, 37888, 3584, 132)
    assert (c.block_m, c.block_n, c.block_k, c.num_warps, c.split, c.swap_ab) == (16, 256, 128, 8, 1, True)
    assert WA._gemm_config(17, 37888, 3584, 132).block_n == 64  # the wide tiles are for the 16-row bucket
    assert WA._gemm_config(1, 18944, 3584, 132).block_n == 64  # 296 tiles of 64: fewer than 4 per SM
    ada = 99 * 1024
    c = WA._gemm_config(1, 4608, 3584, 132, smem=ada)
    assert c.num_stages * (c.block_m + c.block_n) * c.block_k <= ada and c.num_stages >= 2
    c = WA._gemm_config(4096, 4608, 3584, 132, smem=ada)
    assert c.num_stages * (c.block_m + c.block_n) * c.block_k <= ada
    assert WA._gemm_config(1, 4608, 3584, 132, smem=None).num_stages == 6


def test_warm_up_reaches_both_ends_of_every_bucket():
    sizes = WA.warm_up_sizes("int8", 8192)
    assert sizes[:4] == [1, 16, 17, 32] and sizes[-2:] == [1025, 8192]
    for top, _ in WA._TILES["int8"][:-1]:
        assert top in sizes and top + 1 in sizes
    assert WA.warm_up_sizes("fp8", 100) == [1, 16, 17, 32, 33, 64, 65, 100]
    assert WA.warm_up_sizes("fp8", 1) == [1]


def test_warm_up_skips_models_off_the_gpu():
    from pagedserve.quantization.fp8 import Fp8Linear
    from pagedserve.quantization.warmup import warm_up

    model = torch.nn.Sequential(Fp8Linear.from_linear(torch.nn.Linear(32, 16)), torch.nn.Linear(16, 8))
    assert warm_up(model, torch.float32, 64) == 0

