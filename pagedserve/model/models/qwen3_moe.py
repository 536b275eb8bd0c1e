"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): softmax top-k routing, renormalized when `norm_topk_prob`,
no shared expert, Qwen3's per-head q/k RMSNorm; dense MLPs in `mlp_only_layers` and off the
`decoder_sparse_step` grid (hf_config.moe_shape reads both)."""
from __future__ import annotations

from pagedserve.model.models.moe_causal_lm import MoeCausalLM


class Qwen3MoeForCausalLM(MoeCausalLM):
    pass
