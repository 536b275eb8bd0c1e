"""GLM-4 (the 0414 family, `Glm4ForCausalLM`) over the shared layers.

What differs from Llama: each sublayer's output is normed again before the residual add
(`post_self_attn_layernorm`, `post_mlp_layernorm`; `post_attention_layernorm` is the MLP's input norm);
RoPE rotates only the first `partial_rotary_factor` (0.5) of each head, in interleaved pairs; q/k/v carry
a bias, o_proj none. The checkpoint stores gate/up fused as `gate_up_proj`.
"""
from __future__ import annotations

import torch
from torch import nn

from pagedserve.model.layers.mlp import MLP
from pagedserve.model.layers.norm import RMSNorm
from pagedserve.model.layers.rotary import InterleavedRotaryEmbedding
from pagedserve.model.layers.self_attention import Attention
from pagedserve.model.model_args import ModelArgs
from pagedserve.model.models.llama import LlamaForCausalLM


class Glm4DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, backend, layer: int, tp=None):
        super().__init__()
        eps, h = args.rms_norm_eps, args.hidden_size
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = Attention(args, backend, tp, sliding_window=args.window(layer))
        self.post_self_attn_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = MLP(args, tp)
        self.post_mlp_layernorm = RMSNorm(h, eps)

    def forward(self, x, positions, rope, kv_cache, meta):
        x = x + self.post_self_attn_layernorm(self.self_attn(self.input_layernorm(x), positions, rope, kv_cache, meta))
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))


class Glm4ForCausalLM(LlamaForCausalLM):
    def make_layer(self, args: ModelArgs, backend, i: int, tp) -> nn.Module:
        return Glm4DecoderLayer(args, backend, i, tp)

    def make_rope(self, args: ModelArgs, max_len: int) -> InterleavedRotaryEmbedding:
        return InterleavedRotaryEmbedding(args, max_len)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list, meta) -> torch.Tensor:
        x = self.embed_tokens(input_ids) if self.tp is None else self.tp.embed(self.embed_tokens, input_ids)
        rope = self.rope.at(positions, x.dtype)
        for layer, cache in zip(self.layers, kv_caches):
            x = layer(x, positions, rope, cache, meta)
        return self.norm(x)

    def load_hf_weights(self, tensors) -> None:
        def split():
            for name, w in tensors:
                if ".gate_up_proj." in name:
                    gate, up = w.chunk(2)
                    yield name.replace("gate_up_proj", "gate_proj"), gate
                    yield name.replace("gate_up_proj", "up_proj"), up
                else:
                    yield name, w

        super().load_hf_weights(split())
