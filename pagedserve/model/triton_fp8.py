"""Triton kernel: dynamic per-token FP8 quantization of an activation (the A side of the fp8 GEMM).

One program per row: pass 1 reads the row for its absmax, pass 2 reads it again, divides by the scale,
clamps to +-448 and stores e4m3. The second read hits L2 for the row sizes of a linear's input (<= 64 KiB),
so the kernel costs about one read and a half-size write. Scales are fp32 [M, 1], the layout
`torch._scaled_mm` wants for rowwise scaling. No host sync: safe inside CUDA-graph capture.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.model.fp8_dtype import FP8, FP8_MAX


@triton.jit
def _per_token_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm,
                            FMAX: tl.constexpr, MIN_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        k = k0 + offs
        x = tl.load(x_ptr + row * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, 0) / FMAX, MIN_SCALE)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        k = k0 + offs
        x = tl.load(x_ptr + row * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(x / scale, -FMAX), FMAX)
        tl.store(q_ptr + row * stride_qm + k, q.to(q_ptr.dtype.element_ty), mask=k < K)


def per_token_quant_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q float8_e4m3fn [M, K], scale fp32 [M, 1]) with x[m] ~= q[m] * scale[m]."""
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty(m, k, dtype=FP8, device=x.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        block = min(4096, triton.next_power_of_2(k))
        _per_token_quant_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), FMAX=FP8_MAX, MIN_SCALE=1e-12,
                                      BLOCK=block, num_warps=4 if block <= 2048 else 8)
    return q, s
