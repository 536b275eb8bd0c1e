"""Weight-only quantized GEMMs in Triton: y = x @ dequant(W)^T, dequantizing tiles in registers.

* ``int8_linear_triton``: W int8 [N, K] with one scale per output row; the scale multiplies the
  fp32 accumulator once at the end (it is constant along K).
* ``awq_linear_triton``: AWQ GEMM layout (see awq_format.py): qweight int32 [K, N/8], qzeros int32
  [K/G, N/8], scales [K/G, N]. A K tile never straddles a group (BLOCK_K divides G), so each tile
  loads one row of zeros and scales.

Both kernels use grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)); the activation tile and the dequantized
weight tile meet in ``tl.dot`` with an fp32 accumulator. No host synchronisation, so they can be
captured in CUDA graphs. Tile sizes are fixed heuristics by M, not autotuned (benchmarks/gpu_quant.py
times them against bf16 F.linear). Under Triton's CPU interpreter, bf16/fp16 ``tl.dot`` operands are
multiplied as raw bits (triton 3.9), so there the dot runs on fp32 copies.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _int8_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K,
                 stride_xm, stride_wn, stride_ym,
                 HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + rn[None, :] * stride_wn + k[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    s = tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    acc = acc * s[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _awq_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, b_ptr, y_ptr, M, N, K, GROUP,
                stride_xm, stride_ym,
                HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    npk = N // 8  # int32 words per packed row
    j = rn % 8
    shift = ((j // 2) + (j % 2) * 4) * 4  # AWQ_REVERSE_ORDER[j] * 4
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # K % BLOCK_K == 0 (checked by the wrapper)
        k = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_ok[:, None], other=0.0)
        packed = tl.load(qw_ptr + k[:, None] * npk + (rn // 8)[None, :], mask=n_ok[None, :], other=0)
        q = (packed >> shift[None, :]) & 0xF
        g = k0 // GROUP
        zp = tl.load(qz_ptr + g * npk + rn // 8, mask=n_ok, other=0)
        z = (zp >> shift) & 0xF
        s = tl.load(s_ptr + g * N + rn, mask=n_ok, other=0.0)
        w = (q - z[None, :]).to(tl.float32) * s.to(tl.float32)[None, :]
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _interpreted() -> bool:
    return type(_awq_kernel).__name__ == "InterpretedFunction"


def _block_m(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


def _prep(x: torch.Tensor, k: int) -> tuple[torch.Tensor, tuple]:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2, lead


def int8_linear_triton(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (fp16/bf16/fp32) @ (weight int8 [N, K] * scale [N, 1])^T + bias -> [..., N] in x's dtype."""
    n, k = weight.shape
    x2, lead = _prep(x, k)
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bm, bn, bk = _block_m(m), 64, 64
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _int8_kernel[grid](x2, weight, scale, bias if bias is not None else scale, y, m, n, k,
                       x2.stride(0), weight.stride(0), y.stride(0),
                       HAS_BIAS=bias is not None, DOT_FP32=x.dtype == torch.float32 or _interpreted(),
                       BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return y.view(*lead, n)


def awq_linear_triton(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ dequant(qweight, qzeros, scales)^T + bias -> [..., N] in x's dtype."""
    k, n = qweight.shape[0], qweight.shape[1] * 8
    group = k // qzeros.shape[0]
    x2, lead = _prep(x, k)
    m = x2.shape[0]
    bk = min(group, 64)
    if group % bk or bk < 16:
        raise ValueError(f"AWQ group size {group} must be a multiple of 16 (and of 64 when above 64)")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bm, bn = _block_m(m), 64
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _awq_kernel[grid](x2, qweight, qzeros, scales, bias if bias is not None else scales, y, m, n, k, group,
                      x2.stride(0), y.stride(0),
                      HAS_BIAS=bias is not None, DOT_FP32=x.dtype == torch.float32 or _interpreted(),
                      BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return y.view(*lead, n)
