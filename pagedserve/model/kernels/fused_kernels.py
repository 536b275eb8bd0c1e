"""Triton kernels for the decoder layer's elementwise work: RMSNorm, residual add + RMSNorm,
SiLU-and-mul, in-place RoPE. The norms can also emit their output quantized per token (fp8/int8) for
the W8A8 linear that reads it, saving that linear's own quant kernel. Use them through `pagedserve.model.kernels.fused_ops`, which
holds the torch references and picks an implementation per tensor.

Each kernel reads its inputs once and writes its outputs once, computes in
fp32, and rounds to the model dtype exactly where Hugging Face's eager code
rounds (see each kernel), so bf16/fp16 results match the eager model bit for
bit except where a transcendental (rsqrt, exp) or a reduction order differs
in the last fp32 bit; that moves a result by at most one ulp of the dtype.

Launch grids depend only on shapes, never on tensor values, and nothing reads
a value back to the host, so every call can be captured in a CUDA graph.

Triton's CPU interpreter (triton 3.9) truncates fp32 -> bf16 instead of
rounding to nearest even as the GPU does; under the interpreter the kernels
round bf16 through an integer bit trick first (`RNE` below), so CPU tests
check the same rounding the GPU performs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.quantization.triton_w8a8 import qmax, quant_scale, quantize


@triton.jit
def _rnd(x, like_ptr, RNE: tl.constexpr):
    """fp32 x rounded to like_ptr's element type (nearest even), returned as that type."""
    dt = like_ptr.dtype.element_ty
    if RNE:
        if dt == tl.bfloat16:
            b = x.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
            x = b.to(tl.float32, bitcast=True)
    return x.to(dt)


# --------------------------------------------------------------------------
# RMSNorm and residual add + RMSNorm: one program per row
# --------------------------------------------------------------------------
@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, new_res_ptr, s_ptr,
    stride_x, stride_r, stride_y, stride_nr,
    eps, H: tl.constexpr, BLOCK: tl.constexpr, ADD: tl.constexpr, RNE: tl.constexpr,
    QUANT: tl.constexpr = False, QMAX: tl.constexpr = 1.0, IS_INT: tl.constexpr = False,
):
    """HF LlamaRMSNorm: y = w * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype).

    ADD: x = (x + residual) first, rounded to x.dtype (the model adds in its own
    dtype), stored to new_res_ptr and normalised.
    QUANT: y (rounded to x.dtype) is quantized per token for the W8A8 linear that reads it: y_ptr gets
    the fp8/int8 row, s_ptr the row's fp32 scale, exactly as triton_w8a8.per_token_quant(y) would.
    """
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if ADD:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        s = _rnd(x + r, x_ptr, RNE)
        tl.store(new_res_ptr + row * stride_nr + offs, s, mask=mask)
        x = s.to(tl.float32)
    var = tl.div_rn(tl.sum(x * x, axis=0), H)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    n = _rnd(x * rstd, x_ptr, RNE).to(tl.float32)  # rounded to x.dtype before the weight
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if QUANT:
        y = _rnd(w * n, x_ptr, RNE).to(tl.float32)  # padding lanes are 0: they never raise the absmax
        scale = quant_scale(tl.max(tl.abs(y), 0), QMAX)
        tl.store(s_ptr + row, scale)
        tl.store(y_ptr + row * stride_y + offs, quantize(y, scale, y_ptr, QMAX, IS_INT), mask=mask)
    else:
        tl.store(y_ptr + row * stride_y + offs, _rnd(w * n, y_ptr, RNE), mask=mask)


def _row_launch(h: int) -> tuple[int, int]:
    block = triton.next_power_of_2(h)
    num_warps = min(16, max(1, block // 256))
    return block, num_warps


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., H] -> [T, H] with a unit stride along H (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype,
              residual: torch.Tensor | None = None, new_residual: torch.Tensor | None = None,
              quant: torch.dtype | None = None):
    """One launch of _rms_norm_kernel over the rows of x; with `residual`, adds it first (ADD).
    Returns y, or with `quant` (fp8/int8; out_dtype must be x.dtype) y quantized per token: (q, scale)."""
    h = x.shape[-1]
    x2 = _rows(x)
    add = residual is not None
    r2 = residual.view(-1, h) if add else x2
    y = torch.empty(x2.shape if quant else x.shape, dtype=quant or out_dtype, device=x.device)
    t = x2.shape[0]
    s = torch.empty(t, 1, dtype=torch.float32, device=x.device) if quant else None
    if t == 0:
        return (y, s) if quant else y
    y2 = y.view(-1, h)
    nr2 = new_residual.view(-1, h) if add else y2
    block, warps = _row_launch(h)
    _rms_norm_kernel[(t,)](
        x2, r2, weight, y2, nr2, s if quant else y2,
        x2.stride(0), r2.stride(0) if add else 0, y2.stride(0), nr2.stride(0) if add else 0,
        float(eps), H=h, BLOCK=block, ADD=add, RNE=INTERPRETED, num_warps=warps,
        **(_quant_args(quant, x.dtype, out_dtype) if quant else {}),
    )
    return (y, s) if quant else y


def _quant_args(quant: torch.dtype, x_dtype: torch.dtype, out_dtype: torch.dtype) -> dict:
    if out_dtype != x_dtype:
        raise ValueError(f"a quantized norm output rounds to x's dtype {x_dtype} first, not {out_dtype}")
    return dict(QUANT=True, QMAX=qmax(quant), IS_INT=quant == torch.int8)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    out_dtype: torch.dtype, quant: torch.dtype | None = None):
    return _rms_norm(x, weight, eps, out_dtype, quant=quant)


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                        out_dtype: torch.dtype, new_residual: torch.Tensor, quant: torch.dtype | None = None):
    """Writes x + residual into new_residual (may be residual itself) and returns the norm."""
    return _rms_norm(x, weight, eps, out_dtype, residual, new_residual, quant)


# --------------------------------------------------------------------------
# SiLU(gate) * up
# --------------------------------------------------------------------------
@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, stride_gu, stride_o, I: tl.constexpr, BLOCK: tl.constexpr,
                     RNE: tl.constexpr):
    """out = silu(gate) * up, silu rounded to the dtype before the product (as F.silu then mul)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    g = tl.load(gu_ptr + row * stride_gu + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + I + offs, mask=mask, other=0.0).to(tl.float32)
    s = _rnd(tl.div_rn(g, 1.0 + tl.exp(-g)), out_ptr, RNE).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, _rnd(s * u, out_ptr, RNE), mask=mask)


def silu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    two_i = gate_up.shape[-1]
    i = two_i // 2
    gu = _rows(gate_up)
    out = torch.empty((*gate_up.shape[:-1], i), dtype=gate_up.dtype, device=gate_up.device)
    t = gu.shape[0]
    if t == 0 or i == 0:
        return out
    o2 = out.view(-1, i)
    block = min(1024, triton.next_power_of_2(i))
    _silu_mul_kernel[(t, triton.cdiv(i, block))](
        gu, o2, gu.stride(0), o2.stride(0), I=i, BLOCK=block, RNE=INTERPRETED,
        num_warps=4 if block >= 512 else 2,
    )
    return out


# --------------------------------------------------------------------------
# RoPE, in place, q and k heads together
# --------------------------------------------------------------------------
@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, stride_t, stride_h, stride_ct, stride_st, NH,
                 HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_H: tl.constexpr, RNE: tl.constexpr):
    """x[:half], x[half:] <- x1*cos1 - x2*sin1, x2*cos2 + x1*sin2 (rotate_half), in fp32, rounded once."""
    t = tl.program_id(0).to(tl.int64)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, HALF_PAD)
    dmask = d < HALF
    c1 = tl.load(cos_ptr + t * stride_ct + d, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + t * stride_ct + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + t * stride_st + d, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + t * stride_st + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    mask = (hs < NH)[:, None] & dmask[None, :]
    p1 = x_ptr + t * stride_t + hs[:, None].to(tl.int64) * stride_h + d[None, :]
    p2 = p1 + HALF
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * c1[None, :] - x2 * s1[None, :]
    o2 = x2 * c2[None, :] + x1 * s2[None, :]
    tl.store(p1, _rnd(o1, x_ptr, RNE), mask=mask)
    tl.store(p2, _rnd(o2, x_ptr, RNE), mask=mask)


def rope_triton(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    t, nh, d = qk.shape
    if t == 0 or nh == 0:
        return qk
    half = d // 2
    half_pad = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(nh), max(1, 2048 // half_pad))
    _rope_kernel[(t, triton.cdiv(nh, block_h))](
        qk, cos, sin, qk.stride(0), qk.stride(1), cos.stride(0), sin.stride(0), nh,
        HALF=half, HALF_PAD=half_pad, BLOCK_H=block_h, RNE=INTERPRETED,
        num_warps=4 if block_h * half_pad >= 1024 else 2,
    )
    return qk


# Decided when the kernels were decorated (TRITON_INTERPRET=1 at import time).
INTERPRETED = type(_rms_norm_kernel).__name__ == "InterpretedFunction"
