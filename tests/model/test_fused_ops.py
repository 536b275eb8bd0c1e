"""Fused decoder-layer kernels (RMSNorm, add + RMSNorm, SiLU-and-mul, RoPE) against the
Hugging Face-style torch references in `pagedserve.model.kernels.fused_ops`.

On a CUDA machine the kernels run compiled; elsewhere through Triton's CPU
interpreter, set up by tests/triton_interp.py
(TRITON_INTERPRET=1 only while this module imports the kernels and while its
tests run). Shapes are small so the interpreter finishes in seconds.

Accuracy contract checked here, in units of the dtype's ulp:
  rms_norm / add_rms_norm / silu_mul: <= 1 ulp, and >= 99% of elements bit-identical;
  new_residual of add_rms_norm: bit-identical;
  rope_: <= 2 ulp against the reference (which rounds three times) and <= 1 ulp
  against the exact fp64 result; fp32 within ~1e-6.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pagedserve.model.kernels import fused_ops as FO

from tests.triton_interp import DEVICE, ON_CUDA, import_kernels, interpreter_fixture, subprocess_test

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FK, _NEEDS_SUBPROCESS = import_kernels("pagedserve.model.kernels.fused_kernels", lambda m: m.INTERPRETED)
_interpret = interpreter_fixture(_NEEDS_SUBPROCESS, run_anyway=("test_bench_dry_run",))
test_in_subprocess = subprocess_test(__file__, _NEEDS_SUBPROCESS)


# ------------------------------------------------------------------ helpers
MANT_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


def _ulps(out: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor | None = None) -> torch.Tensor:
    """|out - ref| in units of the dtype's ulp at `mag` (default: the larger magnitude of the two)."""
    a, b = out.double().cpu(), ref.double().cpu()
    mag = torch.maximum(a.abs(), b.abs()) if mag is None else mag.double().cpu()
    mag = mag.clamp_min(torch.finfo(out.dtype).tiny)
    _, e = torch.frexp(mag)
    ulp = torch.ldexp(torch.ones_like(mag), e - 1 - MANT_BITS[out.dtype])
    return (a - b).abs() / ulp


def _assert_ulp(out, ref, max_ulp: float, min_identical: float = 0.0, mag=None):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    u = _ulps(out, ref, mag)
    worst = u.max().item()
    same = (out == ref).float().mean().item()
    assert worst <= max_ulp, f"max error {worst:.2f} ulp > {max_ulp}"
    assert same >= min_identical, f"only {same:.3%} of elements bit-identical"
    return worst, same


def _rand(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


# ------------------------------------------------------------------ RMSNorm
NORM_CASES = [(1, 576), (5, 96), (3, 100), (2, 896)]


@pytest.mark.parametrize("t,h", NORM_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_matches_hf(t, h, dtype):
    x = _rand(t, h, dtype=dtype, seed=h + t, scale=3.0)
    w = (1 + 0.3 * _rand(h, dtype=torch.float32, seed=7)).to(dtype)
    ref = FO.rms_norm_ref(x, w, 1e-6)
    out = FO.rms_norm(x, w, 1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=2e-6)
    else:
        _assert_ulp(out, ref, 1, 0.99)


def test_rms_norm_eps_and_weight_rounding():
    """Tiny activations make eps dominate (catches eps outside the sqrt or added twice); a weight
    far from 1 catches multiplying by the weight before the cast to the model dtype."""
    h = 96
    x = _rand(4, h, dtype=torch.bfloat16, seed=1, scale=1e-3)
    w = (3 * _rand(h, dtype=torch.float32, seed=2)).bfloat16()
    for eps in (1e-6, 1e-5, 1e-2):
        _assert_ulp(FO.rms_norm(x, w, eps), FO.rms_norm_ref(x, w, eps), 1, 0.99)
    # Reference sanity: with eps >> mean(x^2) the output is ~ w * x / sqrt(eps).
    approx = (w.float() * x.float() / 1e-2 ** 0.5)
    assert (FO.rms_norm(x, w, 1e-2).float() - approx).abs().max() < 0.05 * approx.abs().max()


def test_rms_norm_3d_and_fp32_weight():
    """[B, S, H] input; a fp32 weight on bf16 activations gives fp32 output (torch promotion, as HF)."""
    x = _rand(2, 3, 40, dtype=torch.bfloat16, seed=3)
    w = 1 + 0.1 * _rand(40, dtype=torch.float32, seed=4)
    out = FO.rms_norm(x, w, 1e-5)
    ref = FO.rms_norm_ref(x, w, 1e-5)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 40)
    torch.testing.assert_close(out, ref, atol=0, rtol=2 ** -22)


def test_rms_norm_strided_rows():
    """Rows of a wider buffer (row stride != H) are read in place."""
    buf = _rand(3, 160, dtype=torch.bfloat16, seed=5)
    x = buf[:, 16:112]
    assert not x.is_contiguous()
    w = _rand(96, dtype=torch.bfloat16, seed=6)
    _assert_ulp(FO.rms_norm(x, w, 1e-6), FO.rms_norm_ref(x, w, 1e-6), 1, 0.99)


# ------------------------------------------------------------------ add + RMSNorm
@pytest.mark.parametrize("t,h", [(1, 576), (4, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_matches_hf(t, h, dtype):
    x = _rand(t, h, dtype=dtype, seed=10 + h, scale=2.0)
    res = _rand(t, h, dtype=dtype, seed=11 + h, scale=5.0)
    w = (1 + 0.3 * _rand(h, dtype=torch.float32, seed=12)).to(dtype)
    hf_res = res + x  # HF: residual add in the model dtype, then the norm of that
    hf_y = FO.rms_norm_ref(hf_res, w, 1e-6)

    res_in = res.clone()
    y, new_res = FO.add_rms_norm(x, res_in, w, 1e-6)
    assert new_res.data_ptr() == res_in.data_ptr(), "inplace=True writes the sum into residual"
    assert torch.equal(new_res, hf_res)
    if dtype == torch.float32:
        torch.testing.assert_close(y, hf_y, atol=1e-6, rtol=2e-6)
    else:
        _assert_ulp(y, hf_y, 1, 0.99)

    res_keep = res.clone()
    y2, new2 = FO.add_rms_norm(x, res_keep, w, 1e-6, inplace=False)
    assert torch.equal(res_keep, res), "inplace=False leaves residual untouched"
    assert torch.equal(new2, hf_res) and torch.equal(y2, y)


def test_add_rms_norm_rejects_mismatch():
    x = _rand(2, 96, dtype=torch.bfloat16, seed=1)
    w = _rand(96, dtype=torch.bfloat16, seed=2)
    with pytest.raises(ValueError, match="same shape and dtype"):
        FO.add_rms_norm(x, x.float(), w, 1e-6)
    with pytest.raises(ValueError, match="last dimension"):
        FO.rms_norm(x, w[:64], 1e-6)


# ------------------------------------------------------------------ SiLU and mul
@pytest.mark.parametrize("shape", [(1, 2 * 96), (5, 2 * 100), (2, 3, 2 * 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_hf(shape, dtype):
    gu = _rand(*shape, dtype=dtype, seed=shape[-1], scale=4.0)  # spans silu's curved region and tails
    out = FO.silu_mul(gu)
    ref = FO.silu_mul_ref(gu)
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=2e-6)
    else:
        _assert_ulp(out, ref, 1, 0.99)


def test_silu_mul_gate_is_first_half():
    """Swapping gate and up would still pass a symmetric test; silu(0) * up == 0 catches it."""
    i = 48
    gu = torch.cat([torch.zeros(2, i), torch.full((2, i), 3.0)], dim=-1).to(DEVICE)
    assert (FO.silu_mul(gu) == 0).all()
    gu = torch.cat([torch.full((2, i), 3.0), torch.ones(2, i)], dim=-1).to(DEVICE)
    torch.testing.assert_close(FO.silu_mul(gu), torch.full((2, i), 3.0 / (1 + torch.exp(torch.tensor(-3.0))).item(),
                                                           device=DEVICE))


def test_silu_mul_rejects_odd_width():
    with pytest.raises(ValueError, match="even"):
        FO.silu_mul(torch.zeros(2, 7, device=DEVICE))


# ------------------------------------------------------------------ per-token quantized outputs
def _per_token_quant(y: torch.Tensor, quant: torch.dtype):
    import pagedserve.quantization.triton_w8a8 as WA  # the kernel module fused_kernels itself imported

    return WA.per_token_quant(y.reshape(-1, y.shape[-1]), quant)


def _same_quant(qa, q, s, dtype):
    assert isinstance(qa, FO.QuantizedActivation) and qa.dtype == dtype
    assert qa.q.dtype == q.dtype and qa.q.shape == q.shape and qa.scale.shape == s.shape
    assert torch.equal(qa.scale, s)
    assert torch.equal(qa.q.view(torch.uint8) if q.dtype != torch.int8 else qa.q,
                       q.view(torch.uint8) if q.dtype != torch.int8 else q)


@pytest.mark.parametrize("kind", ["fp8", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h", [96, 100])
def test_norms_quantized_output_equals_norm_then_quant(kind, dtype, h):
    """The norm kernel asked for `quant` writes exactly what the norm followed by the W8A8 module's own
    per-token quant writes (same helper, same values): bit-identical q and scales, with and without the
    residual add (whose sum is still written in full). H=100 leaves padding lanes in the row block."""
    quant = torch.float8_e4m3fn if kind == "fp8" else torch.int8
    x = _rand(4, h, dtype=dtype, seed=h, scale=3.0)
    x[2] = 0  # an all-zero row: the scale floor, zeros out
    r = _rand(4, h, dtype=dtype, seed=h + 1)
    w = (1 + 0.3 * _rand(h, dtype=torch.float32, seed=7)).to(dtype)
    _same_quant(FO.rms_norm(x, w, 1e-6, quant), *_per_token_quant(FO.rms_norm(x, w, 1e-6), quant), dtype)
    y_ref, res_ref = FO.add_rms_norm(x, r, w, 1e-6, inplace=False)
    qa, res = FO.add_rms_norm(x, r.clone(), w, 1e-6, quant=quant)
    _same_quant(qa, *_per_token_quant(y_ref, quant), dtype)
    assert torch.equal(res, res_ref)
    # the output rounds to x's dtype before it is quantized: a wider weight dtype gets the plain norm
    assert isinstance(FO.rms_norm(x, w.float(), 1e-6, quant), torch.Tensor) or dtype == torch.float32


def test_quantized_output_reaches_the_w8a8_gemm():
    """A QuantizedActivation from the norm is what Fp8Linear/Int8Linear's GEMM consumes: their forward on it
    equals the W8A8 GEMM on the separately quantized norm output."""
    import pagedserve.quantization.triton_w8a8 as WA
    from pagedserve.quantization.methods import Int8Linear

    lin = Int8Linear.from_linear(torch.nn.Linear(96, 40).to(torch.bfloat16)).to(DEVICE)
    x = _rand(5, 96, dtype=torch.bfloat16, seed=3)
    w = _rand(96, dtype=torch.bfloat16, seed=4)
    q, s = _per_token_quant(FO.rms_norm(x, w, 1e-6), torch.int8)
    want = WA.w8a8_gemm(q, s, lin.weight, lin.scale, lin.bias, torch.bfloat16)
    assert torch.equal(lin(FO.rms_norm(x, w, 1e-6, torch.int8)), want)


# ------------------------------------------------------------------ RoPE
def _rope_tables(positions, d, dtype, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    freqs = torch.outer(torch.tensor(positions, dtype=torch.float32), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype).to(DEVICE), emb.sin().to(dtype).to(DEVICE)


def _qkv(t, nh, nkv, d, dtype, seed):
    """The fused qkv projection output and the [T, nh + nkv, D] strided view of its q and k heads."""
    qkv = _rand(t, (nh + 2 * nkv) * d, dtype=dtype, seed=seed, scale=2.0)
    qk = qkv[:, :(nh + nkv) * d].view(t, nh + nkv, d)
    return qkv, qk


@pytest.mark.parametrize("positions", [[7], [0, 1, 5, 300, 4095]])
@pytest.mark.parametrize("d", [64, 96])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_matches_hf_on_fused_qkv_view(positions, d, dtype):
    t, nh, nkv = len(positions), 6, 2
    qkv, qk = _qkv(t, nh, nkv, d, dtype, seed=d + t)
    assert t == 1 or (qk.stride(0) == (nh + 2 * nkv) * d and not qk.is_contiguous())
    cos, sin = _rope_tables(positions, d, dtype)
    x0 = qk.clone()
    v_before = qkv[:, (nh + nkv) * d:].clone()
    ref = FO.rope_ref_(x0.clone(), cos.unsqueeze(1), sin.unsqueeze(1))
    out = FO.rope_(qk, cos.unsqueeze(1), sin.unsqueeze(1))  # [T, 1, D] as llama.py gathers them
    assert out.data_ptr() == qkv.data_ptr(), "rope_ rotates in place"
    assert torch.equal(qkv[:, (nh + nkv) * d:], v_before), "the V columns are not touched"
    # exact result from the same (rounded) inputs, rounded once
    xd, cd, sd = x0.double(), cos.double()[:, None], sin.double()[:, None]
    h = d // 2
    exact = (xd * cd + torch.cat([-xd[..., h:], xd[..., :h]], -1) * sd).to(dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(qk, ref, atol=2e-6, rtol=2e-6)
        torch.testing.assert_close(qk, exact, atol=2e-6, rtol=2e-6)
    else:
        # RoPE rotates each (x[i], x[i + D/2]) pair, keeping its length; the reference rounds
        # x*cos and rotate_half(x)*sin before adding them, so its error scales with that length,
        # not with the (possibly cancelled) result: ulps are counted at the pair's length.
        pair = torch.cat([xd[..., :h], xd[..., :h]], -1).hypot(torch.cat([xd[..., h:], xd[..., h:]], -1))
        _assert_ulp(qk, ref, 2, mag=pair)
        _assert_ulp(qk, exact, 1, 0.9, mag=pair)


def test_rope_2d_tables_and_position_zero_is_identity():
    t, nh, nkv, d = 3, 4, 2, 64
    _, qk = _qkv(t, nh, nkv, d, torch.bfloat16, seed=3)
    x0 = qk.clone()
    cos, sin = _rope_tables([0, 0, 0], d, torch.bfloat16)
    FO.rope_(qk, cos, sin)  # [T, D] tables
    assert torch.equal(qk, x0)


def test_rope_rejects_bad_shapes():
    qk = torch.zeros(2, 3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="cos must be"):
        FO.rope_(qk, torch.zeros(3, 8, device=DEVICE), torch.zeros(2, 8, device=DEVICE))
    with pytest.raises(ValueError, match="even"):
        FO.rope_(torch.zeros(2, 3, 7, device=DEVICE), torch.zeros(2, 7), torch.zeros(2, 7))


# ------------------------------------------------------------------ dispatch, graphs, benchmark
def test_dispatch_uses_triton_only_where_it_should():
    x = torch.zeros(2, 8, device=DEVICE)
    assert FO._triton_for(x) is FK
    if not ON_CUDA:
        del os.environ["TRITON_INTERPRET"]  # restored by the fixture
        assert FO._triton_for(x) is None


def test_cuda_graph_capture():
    if not ON_CUDA:
        pytest.skip("CUDA graphs need a GPU")
    t, h, i, nh, nkv, d = 4, 896, 4864, 14, 2, 64
    x = _rand(t, h, dtype=torch.bfloat16, seed=1)
    res = _rand(t, h, dtype=torch.bfloat16, seed=2)
    w = _rand(h, dtype=torch.bfloat16, seed=3)
    gu = _rand(t, 2 * i, dtype=torch.bfloat16, seed=4)
    qkv, qk = _qkv(t, nh, nkv, d, torch.bfloat16, seed=5)
    cos, sin = _rope_tables([1, 2, 3, 4], d, torch.bfloat16)

    def step():
        y, r = FO.add_rms_norm(x, res, w, 1e-6)
        FO.rope_(qk, cos, sin)
        return FO.rms_norm(y, w, 1e-6), FO.silu_mul(gu)

    res0, qkv0 = res.clone(), qkv.clone()
    step()  # compile outside the capture
    torch.cuda.synchronize()
    res.copy_(res0)
    qkv.copy_(qkv0)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out_norm, out_silu = step()
    res.copy_(res0)
    qkv.copy_(qkv0)
    g.replay()
    torch.cuda.synchronize()
    ref_res = res0 + x
    torch.testing.assert_close(res, ref_res, atol=0, rtol=0)
    _assert_ulp(out_silu, FO.silu_mul_ref(gu), 1, 0.99)


def test_bench_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_fused_ops.py"), "--dry-run"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    import json

    data = json.loads((tmp_path / "gpu_fused_ops.json").read_text())
    checked = [row for row in data["rows"] if row["op"] != "layer"]
    assert {row["op"] for row in checked} == {"rms_norm", "add_rms_norm", "silu_mul", "rope"}
    assert all(row["max_ulp"] <= 2 and row["fused_us"] > 0 for row in checked)
    assert "speedup" in r.stdout
