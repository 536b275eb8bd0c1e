"""Qwen (v1: Qwen-7B/14B/72B and -Chat, HF architecture `QWenLMHeadModel`), natively.

The network is the Llama layer stack with its own names: `c_attn` holds q, k and v as contiguous
thirds (with bias), the MLP computes c_proj(w1(x) * silu(w2(x))), so w2 is the gate and w1 the up
projection. What differs is position handling past the training length `seq_length`:

* dynamic NTK: a request whose prompt has L > seq_length tokens rotates with a larger RoPE base
  (`rotary.ntk_alpha`), fixed at its prefill and kept for its decode steps, so each token carries
  its request's prompt length (`AttentionMetadata.prompt_lens`) and one batch mixes bases. Blocks
  written under different alphas hold different K, so the prefix cache keys them apart
  (`prefix_cache_salt`).
* logn attention: the query at 1-based position i > seq_length is scaled by log(i) / log(seq_length).

RoPE runs in fp32 over the whole head, as the reference does in every dtype. The embedding has more
rows (151,936) than the tokenizer has ids (151,851): the padded rows are never sampled.
"""
from __future__ import annotations

import math

import torch

from pagedserve.errors import UnsupportedModelError
from pagedserve.model.layers.linear import _FUSE_DIM
from pagedserve.model.layers.rotary import DynamicNTKRotary, ntk_alpha
from pagedserve.model.model_args import ModelArgs
from pagedserve.model.models.llama import LlamaForCausalLM

# qwen.tiktoken's 151,643 ranks, then <|endoftext|>, <|im_start|>, <|im_end|>, <|extra_0..204|>
# (qwen_tokenizer.SIZE; that module imports transformers, the model does not need to)
TOKENIZER_SIZE = 151_851

_RENAMES = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn.c_proj": "self_attn.o_proj",
            "mlp.w2": "mlp.gate_proj", "mlp.w1": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}


class QWenLMHeadModel(LlamaForCausalLM):
    needs_prompt_lens = True  # the runner fills AttentionMetadata.prompt_lens
    default_stop_ids = (151643, 151644, 151645)  # <|endoftext|>, <|im_start|>, <|im_end|>: ChatML turns end

    def __init__(self, args: ModelArgs, backend, max_len: int, tp=None):
        super().__init__(args, backend, max_len, tp)
        if args.use_logn_attn:
            logn = [math.log(i, args.seq_length) if i > args.seq_length else 1 for i in range(1, max_len + 1)]
            self.register_buffer("logn", torch.tensor(logn), persistent=False)  # fp32, as the reference's
        else:
            self.logn = None
        self.sampled_vocab = min(TOKENIZER_SIZE, args.vocab_size)

    def make_rope(self, args: ModelArgs, max_len: int) -> DynamicNTKRotary:
        return DynamicNTKRotary(args, max_len, args.seq_length, args.use_dynamic_ntk)

    @staticmethod
    def prefix_cache_salt(args: ModelArgs, prompt_len: int) -> int | None:
        """Blocks of requests with different NTK alphas must not share prefix-cache entries."""
        if not args.use_dynamic_ntk:
            return None
        alpha = ntk_alpha(prompt_len, args.seq_length)
        return None if alpha == 1 else hash(("qwen-ntk-alpha", alpha))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list, meta) -> torch.Tensor:
        x = self.embed_tokens(input_ids) if self.tp is None else self.tp.embed(self.embed_tokens, input_ids)
        q_scale = None if self.logn is None else self.logn[positions].to(x.dtype)[:, None, None]
        rope = self.rope.at(positions, meta.prompt_lens, q_scale)  # the same for every layer
        residual = None
        for layer, cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, positions, rope, cache, meta)
        return self.norm.add_forward(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        if self.sampled_vocab < logits.shape[-1]:
            logits[:, self.sampled_vocab:] = float("-inf")
        return logits

    def load_hf_weights(self, tensors) -> None:
        super().load_hf_weights(_llama_names(tensors))


def _llama_names(tensors):
    """QWen checkpoint names -> the Llama names LlamaForCausalLM loads; c_attn is split into q, k, v."""
    for name, w in tensors:
        if name.startswith("transformer."):
            name = name[len("transformer."):]
        if name == "wte.weight":
            yield "embed_tokens.weight", w
            continue
        if name.startswith("ln_f."):
            yield "norm." + name[len("ln_f."):], w
            continue
        if name.startswith("h."):
            name = "layers." + name[len("h."):]
            if ".attn.c_attn." in name:
                kind = name.rsplit(".", 1)[-1]
                dim = _FUSE_DIM.get(kind, (0, 1))[0] if w.dim() > 1 else 0
                if w.shape[dim] % 3:
                    raise UnsupportedModelError(f"checkpoint tensor {name!r}: c_attn's output is not 3 equal parts")
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), w.chunk(3, dim=dim)):
                    yield name.replace("attn.c_attn", "self_attn." + proj), part
                continue
            for old, new in _RENAMES.items():
                if f".{old}." in name:
                    name = name.replace(f".{old}.", f".{new}.")
                    break
        yield name, w
