"""Gemma 3 (text) over the shared layers.

Gemma 2's block, plus: a per-head (1 + w) RMSNorm on q and k before RoPE; `layer_types` (or every
`sliding_window_pattern`-th layer global) choosing local and global layers; and two RoPE tables, the local
layers' at `rope_local_base_freq` without scaling, the global layers' at `rope_theta` with `rope_scaling`
(linear on the larger checkpoints). No soft-caps unless the config sets them.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from pagedserve.model.layers.norm import GemmaRMSNorm
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.model_args import ModelArgs
from pagedserve.model.models.gemma2 import Gemma2DecoderLayer, Gemma2ForCausalLM


class Gemma3DecoderLayer(Gemma2DecoderLayer):
    def __init__(self, args: ModelArgs, backend, layer: int, tp=None):
        super().__init__(args, backend, layer, tp)
        self.self_attn.q_norm = GemmaRMSNorm(args.head_dim, args.rms_norm_eps)
        self.self_attn.k_norm = GemmaRMSNorm(args.head_dim, args.rms_norm_eps)
        self.local = bool(args.window(layer))

    def forward(self, x, positions, rope, kv_cache, meta):
        return super().forward(x, positions, rope[self.local], kv_cache, meta)


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    def __init__(self, args: ModelArgs, backend, max_len: int, tp=None):
        super().__init__(args, backend, max_len, tp)
        local = dataclasses.replace(self.args, rope_theta=self.args.rope_local_theta or 10000.0, rope_scaling=None)
        self.rope_local = RotaryEmbedding(local, max_len)

    def make_layer(self, args: ModelArgs, backend, i: int, tp) -> nn.Module:
        return Gemma3DecoderLayer(args, backend, i, tp)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list, meta) -> torch.Tensor:
        x = self.embed_tokens(input_ids) if self.tp is None else self.tp.embed(self.embed_tokens, input_ids)
        x = x * torch.tensor(self.args.hidden_size ** 0.5, dtype=x.dtype)  # rounded to the dtype, as HF
        rope = (self.rope.at(positions, x.dtype), self.rope_local.at(positions, x.dtype))  # (global, local)
        for layer, cache in zip(self.layers, kv_caches):
            x = layer(x, positions, rope, cache, meta)
        return self.norm(x)
