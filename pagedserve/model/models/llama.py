"""Llama-family decoder (Llama, SmolLM2, Mistral, Qwen2, Qwen3) over a paged KV cache.

One class covers the family; config flags switch the differences:
Qwen2's bias on q/k/v, Qwen3's per-head RMSNorm on q and k, tied embeddings,
RoPE scaling, Mistral's (and Qwen's optional) sliding window. Q, K, V share one matmul and gate/up share another.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.errors import UnsupportedModelError
from pagedserve.model.layers.decoder import DecoderLayer
from pagedserve.model.layers.linear import load_part
from pagedserve.model.layers.norm import RMSNorm
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.model_args import ModelArgs


class LlamaForCausalLM(nn.Module):
    def __init__(self, args: ModelArgs, backend, max_len: int, tp=None):
        """`tp` (a TPGroup) builds this rank's shard: `args` stay the full model's, `self.args` the local shapes."""
        super().__init__()
        self.tp, self.full_args = tp, args
        if tp is not None:
            args = tp.shard.local_args(args)
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(self.make_layer(args, backend, i, tp) for i in range(args.num_layers))
        self.norm = self.make_norm(args)
        self.rope = self.make_rope(args, max_len)
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    # The parts a family over this skeleton replaces (Gemma, GLM): one decoder layer, the final norm, RoPE.
    def make_layer(self, args: ModelArgs, backend, i: int, tp) -> nn.Module:
        return DecoderLayer(args, backend, tp, sliding_window=args.window(i))

    def make_norm(self, args: ModelArgs) -> nn.Module:
        return RMSNorm(args.hidden_size, args.rms_norm_eps)

    def make_rope(self, args: ModelArgs, max_len: int) -> RotaryEmbedding:
        return RotaryEmbedding(args, max_len)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list, meta) -> torch.Tensor:
        """input_ids/positions [T] -> final hidden states [T, hidden]."""
        x = self.embed_tokens(input_ids) if self.tp is None else self.tp.embed(self.embed_tokens, input_ids)
        rope = self.rope.at(positions, x.dtype)  # the same for every layer
        residual = None
        for layer, cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, positions, rope, cache, meta)
        return self.norm.add_forward(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:  # a module call, so the runner may swap in a faster linear
            logits = self.lm_head(hidden)
        else:
            logits = F.linear(hidden, self.embed_tokens.weight)
        if self.tp is not None:  # this rank's vocabulary slice -> the full row, on rank 0
            logits = self.tp.gather_logits(logits)
        return logits.float()

    # -- weights ---------------------------------------------------------
    def load_hf_weights(self, tensors) -> None:
        """Load HF-named tensors (an iterable of (name, tensor)), fusing q/k/v and gate/up."""
        params = dict(self.named_parameters())
        fused = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "gate_proj": 0, "up_proj": 1}
        loaded = set()
        a = self.args
        qkv_sizes = [a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.num_kv_heads * a.head_dim]
        for name, w in tensors:
            if name.startswith("model."):
                name = name[len("model."):]
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: some checkpoints still store a copy
            if self.tp is not None:  # this rank's slice of the tensor (None: another rank holds it)
                w = self.tp.shard.shard_hf_tensor(name, w)
                if w is None:
                    continue
            parts = name.split(".")
            target, offset, size = name, 0, None
            if len(parts) >= 2 and parts[-2] in fused:
                proj, idx = parts[-2], fused[parts[-2]]
                if proj in ("q_proj", "k_proj", "v_proj"):
                    target = ".".join(parts[:-2] + ["qkv_proj", parts[-1]])
                    offset, size = sum(qkv_sizes[:idx]), qkv_sizes[idx]
                else:
                    target = ".".join(parts[:-2] + ["gate_up_proj", parts[-1]])
                    offset, size = idx * a.intermediate_size, a.intermediate_size
            p = params.get(target)
            if p is None:
                raise UnsupportedModelError(f"checkpoint tensor {name!r} has no place in the model")
            load_part(p, name, w, offset, size)
            loaded.add((target, offset))
        expected = set()
        for pname, p in params.items():
            if ".qkv_proj." in pname:
                expected |= {(pname, sum(qkv_sizes[:i])) for i in range(3)}
            elif ".gate_up_proj." in pname:
                expected |= {(pname, 0), (pname, a.intermediate_size)}
            else:
                expected.add((pname, 0))
        missing = sorted({n for n, _ in expected - loaded})
        if missing:
            raise UnsupportedModelError(
                f"checkpoint is missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}"
            )
