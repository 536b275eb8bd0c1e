"""The pre-norm decoder layer: norm, self-attention, norm, MLP, each add fused into the next norm."""
from __future__ import annotations

from torch import nn

from pagedserve.model.layers import linear
from pagedserve.model.layers.mlp import MLP
from pagedserve.model.layers.norm import RMSNorm
from pagedserve.model.layers.self_attention import Attention
from pagedserve.model.model_args import ModelArgs


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, backend, tp=None):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, backend, tp)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args, tp)

    def forward(self, x, residual, positions, rope, kv_cache, meta):
        """Carries the residual stream apart from the sublayer output, so each add fuses into the next
        norm: returns (mlp output, residual); the layer's output is their sum."""
        quant = linear.input_quant(self.self_attn.qkv_proj, x)
        if residual is None:  # first layer
            residual, h = x, self.input_layernorm(x, quant)
        else:
            h, residual = self.input_layernorm.add_forward(x, residual, quant)
        h = self.self_attn(h, positions, rope, kv_cache, meta)
        h, residual = self.post_attention_layernorm.add_forward(
            h, residual, linear.input_quant(self.mlp.gate_up_proj, h))
        return self.mlp(h), residual
