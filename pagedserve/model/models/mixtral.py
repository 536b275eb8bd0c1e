"""Mixtral (8x7B, 8x22B): top-2 softmax routing, renormalized, experts `w1` (gate), `w3` (up), `w2` (down)
under `block_sparse_moe`; a config's `sliding_window` applies to every layer."""
from __future__ import annotations

from pagedserve.model.models.moe_causal_lm import MoeCausalLM


class MixtralForCausalLM(MoeCausalLM):
    pass
