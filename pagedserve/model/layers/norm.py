"""RMSNorm, optionally fused with the residual add (and, on CUDA, with the next linear's input quant)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.model.kernels import fused_ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, quant: torch.dtype | None = None):
        """`quant` (fused path only): return the output quantized per token (fused_ops.rms_norm)."""
        if fused_ops.enabled(x):
            return fused_ops.rms_norm(x, self.weight, self.eps, quant)
        dtype = x.dtype
        if dtype == torch.float32:  # one fused op; the same arithmetic as below in fp32
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor,
                    quant: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); on CUDA one kernel that writes the sum into `residual`."""
        if fused_ops.enabled(x):
            return fused_ops.add_rms_norm(x, residual, self.weight, self.eps, quant=quant)
        residual = x + residual
        return self(residual), residual
