"""Read a Hugging Face config.json into the decoder shape pagedserve uses.

The model (model_args.ModelArgs) and the memory planner (plan.ModelShape) both derive from
DecoderShape and read config.json through `from_hf` here, so the plan and the engine
cannot disagree on heads, head_dim or biases. No torch import: `pagedserve plan` uses
this without loading torch.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from pagedserve.errors import ConfigError

_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def hf_shape_fields(cfg: Any) -> dict[str, Any]:
    """Everything pagedserve reads from a config.json dict (or a transformers config object, read by
    attribute), under pagedserve's field names."""
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
    return dict(
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
        qkv_bias=model_type == "qwen2" or attention_bias,  # Qwen2 always; others where attention_bias is set
        o_bias=attention_bias and model_type != "qwen2",
        mlp_bias=bool(g("mlp_bias", False)),
        qk_norm=model_type == "qwen3",  # Qwen3's per-head RMSNorm on q and k
        checkpoint_dtype=g("torch_dtype") or g("dtype") or "bfloat16",
    )


@dataclass(kw_only=True)
class DecoderShape:
    """The sizes of a Llama-family decoder that both the model and the planner need."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False

    @classmethod
    def from_hf(cls, cfg: Any, **extra):
        """An instance from a config.json; `extra` sets fields config.json does not hold."""
        vals = hf_shape_fields(cfg)
        return cls(**{f.name: vals[f.name] for f in fields(cls) if f.name in vals and f.name not in extra}, **extra)
