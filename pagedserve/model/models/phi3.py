"""Phi-3 and Phi-4 over the shared layers.

The block is Llama's; the checkpoint stores q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj`,
split here into the parts Llama's loader fuses (so tensor-parallel sharding sees q, k, v, gate and up).
Long-context variants scale RoPE with LongRoPE (rope_scaling type `longrope`, formerly `su`).
"""
from __future__ import annotations

import torch

from pagedserve.errors import UnsupportedModelError
from pagedserve.model.hf_config import is_longrope
from pagedserve.model.layers.rotary import LongRotaryEmbedding
from pagedserve.model.model_args import ModelArgs
from pagedserve.model.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    def __init__(self, args: ModelArgs, backend, max_len: int, tp=None):
        if args.partial_rotary_factor != 1.0:
            raise UnsupportedModelError(
                f"partial_rotary_factor {args.partial_rotary_factor} (Phi-4-mini) is not supported")
        super().__init__(args, backend, max_len, tp)
        if is_longrope(args.rope_scaling):
            self.rope = LongRotaryEmbedding(self.args, max_len)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list, meta) -> torch.Tensor:
        if not isinstance(self.rope, LongRotaryEmbedding):
            return super().forward(input_ids, positions, kv_caches, meta)
        x = self.embed_tokens(input_ids) if self.tp is None else self.tp.embed(self.embed_tokens, input_ids)
        rope = self.rope.at(positions, x.dtype, meta)
        residual = None
        for layer, cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, positions, rope, cache, meta)
        return self.norm.add_forward(x, residual)[0]

    def load_hf_weights(self, tensors) -> None:
        a = self.full_args
        q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim

        def split():
            for name, w in tensors:
                if ".qkv_proj." in name:
                    for part, chunk in zip(("q_proj", "k_proj", "v_proj"), w.split([q, kv, kv])):
                        yield name.replace("qkv_proj", part), chunk
                elif ".gate_up_proj." in name:
                    for part, chunk in zip(("gate_proj", "up_proj"), w.chunk(2)):
                        yield name.replace("gate_up_proj", part), chunk
                else:
                    yield name, w

        super().load_hf_weights(split())
