"""A model's shape and what it costs in bytes: weights (quantized or not), activations, KV per token."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pagedserve.errors import ConfigError
from pagedserve.model.default_model import DEFAULT_MODEL_NAME
from pagedserve.model.hf_config import DecoderShape

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Quantized linear layers as pagedserve stores them (pagedserve/quantization/methods.py):
# int8: 1 byte a weight + one scale a row in the compute dtype;
# int4 AWQ: 0.5 byte a weight + per group of AWQ_GROUP inputs one scale (compute dtype) and a 4-bit zero;
# fp8: 1 byte a weight (e4m3) + one fp32 scale a row.
QUANT_METHODS = (None, "none", "int8", "fp8", "awq", "int4")
# --kv-cache-dtype: bytes per cached K or V element (None: the compute dtype's).
KV_DTYPE_BYTES = {"auto": None, "fp8": 1, "fp8_e4m3": 1}
AWQ_GROUP = 128

# Shapes of well-known checkpoints (from their config.json), so planning needs no download.
KNOWN_MODELS: dict[str, dict] = {
    "Qwen/Qwen-7B": dict(vocab_size=151936, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192,
                         tie_word_embeddings=False, torch_dtype="bfloat16", attention_bias=True),
    "Qwen/Qwen2.5-7B-Instruct": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                     num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                     max_position_embeddings=32768, tie_word_embeddings=False,
                                     torch_dtype="bfloat16", attention_bias=True),
    "Qwen/Qwen2.5-0.5B-Instruct": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                       max_position_embeddings=32768, tie_word_embeddings=True,
                                       torch_dtype="bfloat16", attention_bias=True),
    "meta-llama/Meta-Llama-3-8B-Instruct": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                                num_hidden_layers=32, num_attention_heads=32,
                                                num_key_value_heads=8, max_position_embeddings=8192,
                                                tie_word_embeddings=False, torch_dtype="bfloat16"),
    "meta-llama/Llama-2-7b-hf": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                     max_position_embeddings=4096, tie_word_embeddings=False,
                                     torch_dtype="float16"),
    "Qwen/Qwen3-30B-A3B": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                               num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                               max_position_embeddings=40960, tie_word_embeddings=False, torch_dtype="bfloat16",
                               model_type="qwen3_moe", num_experts=128, num_experts_per_tok=8,
                               moe_intermediate_size=768, norm_topk_prob=True, decoder_sparse_step=1,
                               mlp_only_layers=[]),
    "Qwen/Qwen1.5-MoE-A2.7B": dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632,
                                   num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                                   max_position_embeddings=8192, tie_word_embeddings=False,
                                   torch_dtype="bfloat16", model_type="qwen2_moe", num_experts=60,
                                   num_experts_per_tok=4, moe_intermediate_size=1408,
                                   shared_expert_intermediate_size=5632, norm_topk_prob=False,
                                   decoder_sparse_step=1, mlp_only_layers=[]),
    "mistralai/Mixtral-8x7B-Instruct-v0.1": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                                 num_hidden_layers=32, num_attention_heads=32,
                                                 num_key_value_heads=8, max_position_embeddings=32768,
                                                 tie_word_embeddings=False, torch_dtype="bfloat16",
                                                 model_type="mixtral", num_local_experts=8,
                                                 num_experts_per_tok=2),
    "mistralai/Mistral-7B-Instruct-v0.3": dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                                               num_hidden_layers=32, num_attention_heads=32,
                                               num_key_value_heads=8, max_position_embeddings=32768,
                                               tie_word_embeddings=False, torch_dtype="bfloat16"),
}


@dataclass
class ModelShape(DecoderShape):
    name: str
    checkpoint_dtype: str = "bfloat16"

    @classmethod
    def from_config(cls, cfg: dict, name: str = "model") -> "ModelShape":
        return cls.from_hf(cfg, name=name)

    # -- parameter counts ---------------------------------------------------
    def linear_params(self, active: bool = False) -> int:
        """Weights of the transformer blocks' matmuls (what weight quantization shrinks). `active`: a MoE
        model's per-token share, top-k experts instead of all of them (what one decode step reads)."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = h * (q + 2 * kv) + q * h
        return self.num_layers * attn + 3 * h * self._mlp_width(active)

    def _mlp_width(self, active: bool = False) -> int:
        """Intermediate sizes summed over the layers' MLPs (dense ones, experts and shared experts)."""
        m = self.moe
        if m is None:
            return self.num_layers * self.intermediate_size
        experts = m.top_k if active else m.num_experts
        sparse = len(m.sparse_layers)
        return (sparse * (experts * m.intermediate_size + m.shared_intermediate_size)
                + (self.num_layers - sparse) * self.intermediate_size)

    def linear_rows(self) -> int:
        """Output channels of those matmuls (one int8 scale each)."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        m = self.moe
        mlps = self.num_layers if m is None else (self.num_layers - len(m.sparse_layers)
                                                  + len(m.sparse_layers) * (m.num_experts + (m.shared_intermediate_size > 0)))
        return self.num_layers * ((q + 2 * kv) + h) + 2 * self._mlp_width() + mlps * h

    def other_params(self) -> int:
        """Embeddings, LM head, norms, biases and MoE routers: kept in the compute dtype."""
        emb = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else emb
        norms = self.num_layers * 2 * self.hidden_size + self.hidden_size
        bias = self.num_layers * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.qkv_bias else 0
        m = self.moe
        routers = 0 if m is None else len(m.sparse_layers) * self.hidden_size * (
            m.num_experts + (m.shared_intermediate_size > 0))
        return emb + head + norms + bias + routers

    def num_params(self) -> int:
        return self.linear_params() + self.other_params()

    def active_params(self) -> int:
        """Parameters one token runs through (all of them for a dense model)."""
        return self.linear_params(active=True) + self.other_params()

    def kv_bytes_per_token(self, dtype_bytes: int, tp: int = 1, kv_heads: int | None = None) -> int:
        """K and V for every layer; KV heads split over TP ranks (replicated when fewer heads than ranks;
        with an uneven split the fullest rank, which sets every rank's block count)."""
        kv_heads = kv_heads or max(1, math.ceil(self.num_kv_heads / tp))
        return 2 * self.num_layers * kv_heads * self.head_dim * dtype_bytes

    def tp_shards(self, tp: int):
        """The engine's tensor-parallel partition of this model (ConfigError if it cannot be split)."""
        from pagedserve.distributed.partition import plan_shards

        return plan_shards(self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate_size,
                           self.vocab_size, tp, self.moe)


def weight_bytes(shape: ModelShape, dtype_bytes: int, quantization: str | None = None, tp: int = 1) -> int:
    """Per-GPU weight memory."""
    if quantization not in QUANT_METHODS:
        raise ConfigError(f"quantization must be one of none, int8, fp8, awq/int4, got {quantization!r}",
                          param="quantization")
    n = shape.linear_params()
    if quantization == "int8":
        linear = n + shape.linear_rows() * dtype_bytes
    elif quantization == "fp8":
        linear = n + shape.linear_rows() * 4
    elif quantization in ("awq", "int4"):
        linear = n * (0.5 + (dtype_bytes + 0.5) / AWQ_GROUP)
    else:
        linear = n * dtype_bytes
    return int((linear + shape.other_params() * dtype_bytes) / tp)


def activation_bytes(shape: ModelShape, max_num_batched_tokens: int, dtype_bytes: int) -> int:
    """Peak of one forward over a full token budget: the widest intermediate (MLP gate+up and the
    hidden states around it) plus fp32 logits for the rows that sample. An estimate; the engine
    measures the real peak on the GPU."""
    t = max_num_batched_tokens
    mlp = t * (3 * shape.intermediate_size + 4 * shape.hidden_size) * dtype_bytes
    if shape.moe is not None:  # the fused MoE's slot buffers: [T*k, I] in the dtype, [T*k, H] in fp32
        m = shape.moe
        mlp = max(mlp, t * m.top_k * (m.intermediate_size * dtype_bytes + 4 * shape.hidden_size))
    qkv = t * (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim * dtype_bytes
    logits = min(t, 256) * shape.vocab_size * 4
    return max(mlp, qkv) + logits


def load_shape(model: str | None) -> ModelShape:
    """A preset name, a config.json / model dir / .gguf, a Hub id in the local cache, or None (default)."""
    if model in KNOWN_MODELS:
        return ModelShape.from_config(KNOWN_MODELS[model], model)
    lowered = {k.lower(): k for k in KNOWN_MODELS}
    short = {k.split("/")[-1].lower(): k for k in KNOWN_MODELS}
    key = (model or "").lower()
    if key in lowered or key in short:
        name = lowered.get(key) or short[key]
        return ModelShape.from_config(KNOWN_MODELS[name], name)
    from pagedserve.model.loader import read_hf_config, resolve_model_dir

    try:
        d = resolve_model_dir(model)
    except ConfigError as e:
        if model and not Path(model).exists():
            raise ConfigError(f"{e.message}; known presets: {', '.join(KNOWN_MODELS)}", hint=e.hint) from e
        raise
    return ModelShape.from_config(read_hf_config(d), model or DEFAULT_MODEL_NAME)
