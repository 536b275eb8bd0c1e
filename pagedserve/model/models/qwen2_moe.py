"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): softmax top-k routing without renormalization, plus a
shared expert every token runs, scaled by sigmoid(shared_expert_gate(x)); q/k/v carry a bias."""
from __future__ import annotations

from pagedserve.model.models.moe_causal_lm import MoeCausalLM


class Qwen2MoeForCausalLM(MoeCausalLM):
    pass
