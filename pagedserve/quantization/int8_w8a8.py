"""int8 W8A8 arithmetic (the GPU's int8 scheme, vLLM's too): per-token int8 activations x per-channel int8
weights, integer products, both scales in fp32, one rounding to the compute dtype.

* s_x[m] = max|x[m, :]| / 127, q_x = round(x / s_x) clamped to [-127, 127], rounding half away from zero;
* y = (q_x @ q_w^T) * s_x[:, None] * s_w[None, :] (+ bias).

The GPU runs it in triton_w8a8.py (int32 accumulation on the int8 tensor cores, scales in the GEMM's
epilogue) at every batch size. Accuracy: the activation is quantized too (a relative error of up to
1/254 of the row's absmax per element, larger for rows with outliers), on top of the weight's. This
module is the same arithmetic in torch, on any device: the tests' reference.
"""
from __future__ import annotations

import torch

QMAX = 127.0


def quantize_int8_rows_rne_away(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int8 with round half away from zero (the kernel's rounding): (q int8, scale fp32 [R])."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / QMAX).clamp(min=1e-12)
    v = xf / scale.unsqueeze(-1)
    q = (torch.sign(v) * torch.floor(v.abs() + 0.5)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def int8_w8a8_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """What the W8A8 kernel computes: exact integer products, scales and bias in fp32, one rounding."""
    n, k = weight.shape
    lead = x.shape[:-1]
    q_x, s_x = quantize_int8_rows_rne_away(x.reshape(-1, k))
    acc = (q_x.double() @ weight.double().t()).float()  # exact (integers < 2^53)
    y = acc * s_x[:, None] * scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*lead, n)
