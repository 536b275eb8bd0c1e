"""The gated SiLU MLP: down(silu(gate(x)) * up(x)), gate and up as one matmul."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from pagedserve.model.kernels import fused_ops
from pagedserve.model.model_args import ModelArgs


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, tp=None):
        super().__init__()
        self.inter = args.intermediate_size
        self.tp = tp  # row-parallel down_proj: its bias lives on rank 0 only, added once by the all-reduce
        linear = args.make_linear or nn.Linear
        self.gate_up_proj = linear(args.hidden_size, 2 * self.inter, bias=args.mlp_bias)
        self.down_proj = linear(self.inter, args.hidden_size, bias=args.mlp_bias and (tp is None or tp.rank == 0))

    def forward(self, x):
        gate_up = self.gate_up_proj(x)
        if fused_ops.enabled(gate_up):
            out = self.down_proj(fused_ops.silu_mul(gate_up))
        else:
            gate, up = gate_up.split(self.inter, dim=-1)
            out = self.down_proj(F.silu(gate).mul_(up))
        return out if self.tp is None else self.tp.all_reduce(out)
