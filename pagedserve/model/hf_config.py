"""Read a Hugging Face config.json into the decoder shape pagedserve uses.

The model (model_args.ModelArgs) and the memory planner (plan.ModelShape) both derive from
DecoderShape and read config.json through `from_hf` here, so the plan and the engine
cannot disagree on heads, head_dim or biases. No torch import: `pagedserve plan` uses
this without loading torch.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from pagedserve.errors import ConfigError, UnsupportedModelError

_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def hf_shape_fields(cfg: Any) -> dict[str, Any]:
    """Everything pagedserve reads from a config.json dict (or a transformers config object, read by
    attribute), under pagedserve's field names."""
    g = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    if g("model_type") == "qwen":
        return _qwen_fields(g)
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
    local_theta = g("rope_local_base_freq")  # Gemma 3: the sliding layers' own base
    if isinstance(rope_params, dict) and "full_attention" in rope_params:  # per layer type (Gemma 3)
        local_theta = local_theta or (rope_params.get("sliding_attention") or {}).get("rope_theta")
        rope_params = rope_params["full_attention"]
    partial_rotary = g("partial_rotary_factor")
    if isinstance(rope_params, dict):
        partial_rotary = partial_rotary or rope_params.get("partial_rotary_factor")
        rope_theta = rope_theta or rope_params.get("rope_theta")
        if rope_params.get("rope_type", "default") != "default":
            rope_scaling = rope_params
    if is_longrope(rope_scaling):
        # Phi-3 keeps LongRoPE's switch length at the top level of config.json
        rope_scaling = {"original_max_position_embeddings": g("original_max_position_embeddings")
                        or g("max_position_embeddings", 4096), **rope_scaling}
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
        rope_local_theta=float(local_theta) if local_theta else None,
        partial_rotary_factor=float(partial_rotary or 1.0),
        rope_scaling=rope_scaling,
        rope_freq_factors=g("rope_freq_factors"),
        max_position_embeddings=g("max_position_embeddings", 4096),
        tie_word_embeddings=bool(g("tie_word_embeddings", False)),
        # Qwen2 and Qwen2-MoE always; others where attention_bias is set
        qkv_bias=model_type in ("qwen2", "qwen2_moe") or attention_bias,
        o_bias=attention_bias and model_type not in ("qwen2", "glm4"),  # GLM-4: q/k/v bias only
        mlp_bias=bool(g("mlp_bias", False)),
        qk_norm=model_type in ("qwen3", "qwen3_moe"),  # Qwen3's per-head RMSNorm on q and k
        checkpoint_dtype=g("torch_dtype") or g("dtype") or "bfloat16",
        moe=moe_shape(cfg),
        layer_windows=layer_windows(cfg),
        attn_softcap=float(g("attn_logit_softcapping") or 0.0),
        final_softcap=float(g("final_logit_softcapping") or 0.0),
        query_pre_attn_scalar=g("query_pre_attn_scalar"),
        hidden_act=g("hidden_activation") or g("hidden_act") or "silu",
    )


ROPE_SCALINGS = ("default", "linear", "llama3", "longrope", "su")  # what layers.rotary implements


def check_rope_supported(rope_scaling: dict | None) -> None:
    """A start-up error naming a RoPE scaling type layers.rotary does not implement (yarn, dynamic...)."""
    kind = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
    if kind not in ROPE_SCALINGS:
        raise UnsupportedModelError(
            f"rope_scaling type {kind!r} is not supported (supported: linear, llama3, longrope/su)")


def is_longrope(rope_scaling: dict | None) -> bool:
    """LongRoPE (Phi-3's `longrope`, formerly `su`): the rotation of a sequence depends on its length."""
    return bool(rope_scaling) and rope_scaling.get("rope_type", rope_scaling.get("type")) in ("longrope", "su")


def layer_windows(cfg: Any) -> tuple[int, ...]:
    """Each layer's sliding window (0: global attention), by transformers' rules: `layer_types` where the
    config lists them; else Gemma 2's alternation (even layers local), Qwen's layers from
    `max_window_layers` on when `use_sliding_window`, and every layer for Mistral and Mixtral."""
    g = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    n, window = g("num_hidden_layers"), g("sliding_window") or 0
    model_type = g("model_type", "")
    qwen = model_type.startswith("qwen")
    if not window or (qwen and not g("use_sliding_window", False)):
        return (0,) * n
    types = g("layer_types")
    if types:
        return tuple(window if t == "sliding_attention" else 0 for t in types)
    if model_type == "gemma2":
        return tuple(window if i % 2 == 0 else 0 for i in range(n))
    if g("sliding_window_pattern"):  # Gemma 3: every pattern-th layer global
        return tuple(window if (i + 1) % g("sliding_window_pattern") else 0 for i in range(n))
    if qwen:
        return tuple(window if i >= g("max_window_layers", 28) else 0 for i in range(n))
    return (window,) * n


@dataclass(frozen=True)
class MoeShape:
    """The expert layout of a mixture-of-experts decoder (layers.moe builds it; the planner counts it)."""
    num_experts: int
    top_k: int
    intermediate_size: int  # per expert
    renormalize: bool  # top-k weights rescaled to sum to one
    sparse_layers: tuple[int, ...]  # the layers whose MLP is the MoE; the others are dense
    shared_intermediate_size: int = 0  # Qwen2-MoE's sigmoid-gated shared expert (0: none)

    def describe(self) -> str:
        shared = f" + a shared expert of {self.shared_intermediate_size}" if self.shared_intermediate_size else ""
        return (f"{self.num_experts} experts of intermediate size {self.intermediate_size}, top-{self.top_k}"
                f"{' renormalized' if self.renormalize else ''}{shared}, in {len(self.sparse_layers)} layers")


# Config keys of MoE variants the MoE layer does not implement -> what they switch on.
_UNSUPPORTED_MOE = {
    "kv_lora_rank": "MLA attention", "q_lora_rank": "MLA attention",
    "topk_method": "grouped routing (DeepSeek's noaux_tc with e_score_correction_bias)",
    "n_group": "grouped routing", "topk_group": "grouped routing",
    "scoring_func": "sigmoid routing scores", "routed_scaling_factor": "scaled routed experts",
}


def unsupported_moe_keys(cfg: Any) -> list[str]:
    """The keys (with values) of `cfg` that select an MoE variant pagedserve cannot run."""
    g = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    bad = []
    for key in _UNSUPPORTED_MOE:
        v = g(key)
        if v is None or (key == "scoring_func" and v == "softmax") or (key == "topk_method" and v == "greedy") \
                or (key in ("n_group", "topk_group") and v <= 1) or (key == "routed_scaling_factor" and v == 1.0):
            continue
        bad.append(f"{key}={v!r} ({_UNSUPPORTED_MOE[key]})")
    return bad


def check_moe_supported(cfg: Any) -> None:
    """One UnsupportedModelError naming every unsupported MoE key (DeepSeek-V2/V3-style checkpoints)."""
    bad = unsupported_moe_keys(cfg)
    if bad:
        raise UnsupportedModelError(
            f"this MoE variant is not supported: {', '.join(bad)}; supported MoE families are Qwen3-MoE, "
            "Qwen2-MoE and Mixtral (softmax top-k routing, standard attention)")


def moe_shape(cfg: Any) -> MoeShape | None:
    """The expert layout of Qwen3-MoE, Qwen2-MoE and Mixtral configs; None for dense models."""
    g = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    check_moe_supported(cfg)
    model_type = g("model_type", "")
    layers = g("num_hidden_layers")
    if model_type == "mixtral":
        return MoeShape(g("num_local_experts", 8), g("num_experts_per_tok", 2), g("intermediate_size"), True,
                        tuple(range(layers)))
    if model_type not in ("qwen2_moe", "qwen3_moe"):
        return None
    # Qwen's own configs say num_experts; transformers >= 5 saves it as num_local_experts
    experts, step = g("num_experts") or g("num_local_experts") or 0, g("decoder_sparse_step", 1) or 1
    dense = set(g("mlp_only_layers") or ())
    sparse = tuple(i for i in range(layers) if i not in dense and experts > 0 and (i + 1) % step == 0)
    shared = g("shared_expert_intermediate_size", 0) if model_type == "qwen2_moe" else 0
    return MoeShape(experts, g("num_experts_per_tok"), g("moe_intermediate_size"), bool(g("norm_topk_prob", False)),
                    sparse, shared or 0)
# Qwen v1.0 config.json names, renamed in v1.1 (the revision pagedserve reads)
_QWEN_V10 = {"n_embd": "hidden_size", "n_head": "num_attention_heads", "n_layer": "num_hidden_layers",
             "ffn_hidden_size": "intermediate_size"}
_QWEN_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "seq_length")


def _qwen_fields(g) -> dict[str, Any]:
    """A QWenLMHeadModel config (v1.1 keys). Its intermediate_size is twice the MLP width; c_attn always
    has a bias, the other projections one unless no_bias; RoPE covers rotary_pct of the head."""
    old = [k for k in _QWEN_V10 if g(k) is not None]
    if old:
        raise ConfigError(f"this QWen config.json uses the v1.0 keys {', '.join(old)}",
                          hint="update config.json to the v1.1 revision, whose keys are "
                               f"{', '.join(_QWEN_V10[k] for k in old)}")
    missing = [k for k in _QWEN_REQUIRED if g(k) is None]
    if missing:
        raise ConfigError(f"the QWen config has no {', '.join(missing)}", hint="is this a Qwen (v1) config.json?")
    if float(g("rotary_pct", 1.0)) != 1.0:
        raise ConfigError(f"QWen rotary_pct {g('rotary_pct')} is not supported (only 1.0: RoPE over the whole head)")
    heads, bias = g("num_attention_heads"), not g("no_bias", True)
    dtype = "bfloat16" if g("bf16") else "float16" if g("fp16") else "float32" if g("fp32") else None
    return dict(
        vocab_size=g("vocab_size"),
        hidden_size=g("hidden_size"),
        intermediate_size=g("intermediate_size") // 2,
        num_layers=g("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=g("kv_channels") or g("hidden_size") // heads,
        rms_norm_eps=g("layer_norm_epsilon", 1e-6),
        rope_theta=float(g("rotary_emb_base", 10000.0)),
        rope_scaling=None,
        rope_freq_factors=None,
        max_position_embeddings=g("max_position_embeddings") or g("seq_length"),
        tie_word_embeddings=bool(g("tie_word_embeddings", False)),
        qkv_bias=True,
        o_bias=bias,
        mlp_bias=bias,
        qk_norm=False,
        seq_length=g("seq_length"),
        use_dynamic_ntk=bool(g("use_dynamic_ntk", False)),
        use_logn_attn=bool(g("use_logn_attn", False)),
        checkpoint_dtype=g("torch_dtype") or dtype or "bfloat16",
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
    moe: MoeShape | None = None

    @classmethod
    def from_hf(cls, cfg: Any, **extra):
        """An instance from a config.json; `extra` sets fields config.json does not hold."""
        vals = hf_shape_fields(cfg)
        return cls(**{f.name: vals[f.name] for f in fields(cls) if f.name in vals and f.name not in extra}, **extra)
