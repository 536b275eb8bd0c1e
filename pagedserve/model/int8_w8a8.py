"""int8 W8A8 for large batches: per-token int8 activations x int8 weights on the int8 tensor cores.

At large M the weight-only int8 kernel is bound by math and loses to bf16 cuBLAS; `torch._int_mm`
(cuBLASLt IMMA, int32 accumulation) runs at about twice bf16's tensor-core rate. vLLM's int8 scheme does
the same (dynamic per-token activation scales, per-channel weight scales):

* `per_token_quant_int8`: s_x[m] = max|x[m, :]| / 127, q_x = round(x / s_x) clamped to [-127, 127]
  (round half away from zero; one Triton program a row, no host sync: CUDA-graph safe);
* `torch._int_mm(q_x [M, K], W.t() [K, N]) -> int32 [M, N]` (exact: |acc| <= K * 127^2 < 2^31 for
  K < 133,000). W stays row-major [N, K], so W.t() is the column-major operand cuBLASLt's int8 GEMM wants;
* `_epilogue_kernel`: y = acc * s_x[m] * s_w[n] (+ bias) in fp32, one rounding to the compute dtype.

Accuracy: the activation is now quantized too (a relative error of up to 1/254 of the row's absmax per
element, larger for rows with outliers), on top of the weight's. `int8_w8a8_reference` is the same
arithmetic in torch (any device); the CPU tests check the kernels against it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

QMAX = 127.0


@triton.jit
def _per_token_quant_int8_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm,
                                 QM: tl.constexpr, MIN_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        k = k0 + offs
        x = tl.load(x_ptr + row * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, 0) / QM, MIN_SCALE)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        k = k0 + offs
        x = tl.load(x_ptr + row * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        v = x / scale
        v = v + tl.where(v >= 0, 0.5, -0.5)  # then truncation toward zero: round half away from zero
        v = tl.minimum(tl.maximum(v, -QM), QM)
        tl.store(q_ptr + row * stride_qm + k, v.to(tl.int32).to(tl.int8), mask=k < K)


@triton.jit
def _epilogue_kernel(acc_ptr, sx_ptr, sw_ptr, b_ptr, y_ptr, M, N, stride_am, stride_ym,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    mask = m_ok[:, None] & n_ok[None, :]
    acc = tl.load(acc_ptr + rm[:, None].to(tl.int64) * stride_am + rn[None, :], mask=mask, other=0).to(tl.float32)
    sx = tl.load(sx_ptr + rm, mask=m_ok, other=0.0).to(tl.float32)
    sw = tl.load(sw_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    y = acc * sx[:, None] * sw[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def per_token_quant_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q int8 [M, K], scale fp32 [M]) with x[m] ~= q[m] * scale[m] (Triton)."""
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        block = min(4096, triton.next_power_of_2(k))
        _per_token_quant_int8_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), QM=QMAX, MIN_SCALE=1e-12,
                                           BLOCK=block, num_warps=4 if block <= 2048 else 8)
    return q, s


def scale_epilogue(acc: torch.Tensor, s_x: torch.Tensor, s_w: torch.Tensor, bias: torch.Tensor | None,
                   dtype: torch.dtype) -> torch.Tensor:
    """int32 acc [M, N] -> acc * s_x[:, None] * s_w[None, :] (+ bias) in `dtype` (Triton, one pass)."""
    m, n = acc.shape
    y = torch.empty(m, n, dtype=dtype, device=acc.device)
    bm, bn = 32, 128
    _epilogue_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        acc, s_x, s_w, bias if bias is not None else s_w, y, m, n, acc.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    return y


def int8_w8a8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ (weight int8 [N, K] * scale [N])^T + bias with x quantized per token (CUDA).

    Needs M > 16 and K, N multiples of 8 (`torch._int_mm`); quant_dispatch.int8_use_w8a8 checks that."""
    n, k = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    q_x, s_x = per_token_quant_int8(x2)
    acc = torch._int_mm(q_x, weight.t())
    return scale_epilogue(acc, s_x, scale, bias, x.dtype).view(*lead, n)


# -- the same arithmetic in torch (any device): the tests' reference ---------------------------------------
def quantize_int8_rows_rne_away(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int8 with round half away from zero (the kernel's rounding): (q int8, scale fp32 [R])."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / QMAX).clamp(min=1e-12)
    v = xf / scale.unsqueeze(-1)
    q = (torch.sign(v) * torch.floor(v.abs() + 0.5)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def int8_w8a8_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """What `int8_w8a8_linear` computes: exact integer products, scales and bias in fp32, one rounding."""
    n, k = weight.shape
    lead = x.shape[:-1]
    q_x, s_x = quantize_int8_rows_rne_away(x.reshape(-1, k))
    acc = (q_x.double() @ weight.double().t()).float()  # exact (integers < 2^53)
    y = acc * s_x[:, None] * scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*lead, n)
