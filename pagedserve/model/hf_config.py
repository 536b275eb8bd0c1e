"""Read a Hugging Face config.json into the shape fields pagedserve uses.

The model (llama.ModelArgs) and the memory planner (plan.ModelShape) both read them from
here, so the plan and the engine cannot disagree on heads, head_dim or biases. No torch
import: `pagedserve plan` uses this without loading torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pagedserve.errors import ConfigError

_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass(frozen=True)
class HFShape:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    rope_freq_factors: list[float] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 always; others where attention_bias is set
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # Qwen3's per-head RMSNorm on q and k
    checkpoint_dtype: str


def read_hf_shape(cfg: Any) -> HFShape:
    """`cfg`: a config.json dict, or a transformers config object (read by attribute)."""
    g = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    missing = [k for k in _REQUIRED if g(k) is None]
    if missing:
        raise ConfigError(f"the model config has no {', '.join(missing)}",
                          hint="is this a Llama-family config.json?")
    model_type = g("model_type", "llama")
    heads = g("num_attention_heads")
    attention_bias = bool(g("attention_bias", False))
    rope_scaling = g("rope_scaling") or None
    rope_theta = g("rope_theta")
    rope_params = g("rope_parameters")  # transformers >= 5 folds theta/scaling in here
    if isinstance(rope_params, dict):
        rope_theta = rope_theta or rope_params.get("rope_theta")
        if rope_params.get("rope_type", "default") != "default":
            rope_scaling = rope_params
    return HFShape(
        model_type=model_type,
        vocab_size=g("vocab_size"),
        hidden_size=g("hidden_size"),
        intermediate_size=g("intermediate_size"),
        num_layers=g("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=g("num_key_value_heads") or heads,
        head_dim=g("head_dim") or g("hidden_size") // heads,
        rms_norm_eps=g("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta or 10000.0),
        rope_scaling=rope_scaling,
        rope_freq_factors=g("rope_freq_factors"),
        max_position_embeddings=g("max_position_embeddings", 4096),
        tie_word_embeddings=bool(g("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=attention_bias and model_type != "qwen2",
        mlp_bias=bool(g("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        checkpoint_dtype=g("torch_dtype") or g("dtype") or "bfloat16",
    )
