"""Gemma 2 over the shared layers.

What differs from Llama: RMSNorm scales by (1 + w); the embedding is multiplied by sqrt(hidden); the MLP
is GeGLU (tanh GELU); each sublayer's output is normed again before the residual add (post-norms);
the softmax scale is query_pre_attn_scalar ** -0.5; attention scores and the final logits are
tanh soft-capped; even layers attend within a sliding window, odd layers globally (`layer_types`).
Weights load as Llama's (same tensor names, plus the extra norms); the LM head is tied.
"""
from __future__ import annotations

import torch
from torch import nn

from pagedserve.model.layers.mlp import MLP
from pagedserve.model.layers.norm import GemmaRMSNorm
from pagedserve.model.layers.self_attention import Attention
from pagedserve.model.model_args import ModelArgs
from pagedserve.model.models.llama import LlamaForCausalLM


class Gemma2DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, backend, layer: int, tp=None):
        super().__init__()
        eps, h = args.rms_norm_eps, args.hidden_size
        scale = (args.query_pre_attn_scalar or args.head_dim) ** -0.5
        self.input_layernorm = GemmaRMSNorm(h, eps)
        self.self_attn = Attention(args, backend, tp, sliding_window=args.window(layer), softcap=args.attn_softcap,
                                   scale=scale)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.mlp = MLP(args, tp)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps)

    def forward(self, x, positions, rope, kv_cache, meta):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), positions, rope, kv_cache, meta))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma2ForCausalLM(LlamaForCausalLM):
    def make_layer(self, args: ModelArgs, backend, i: int, tp) -> nn.Module:
        return Gemma2DecoderLayer(args, backend, i, tp)

    def make_norm(self, args: ModelArgs) -> nn.Module:
        return GemmaRMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list, meta) -> torch.Tensor:
        x = self.embed_tokens(input_ids) if self.tp is None else self.tp.embed(self.embed_tokens, input_ids)
        x = x * torch.tensor(self.args.hidden_size ** 0.5, dtype=x.dtype)  # rounded to the dtype, as HF
        rope = self.rope.at(positions, x.dtype)
        for layer, cache in zip(self.layers, kv_caches):
            x = layer(x, positions, rope, cache, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        cap = self.args.final_softcap
        return torch.tanh(logits / cap) * cap if cap else logits
