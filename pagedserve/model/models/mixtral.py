"""Mixtral (8x7B, 8x22B): top-2 softmax routing, renormalized, experts `w1` (gate), `w3` (up), `w2` (down)
under `block_sparse_moe`. Attention has no sliding window here: a config with `sliding_window` caps the
context at the window (engine start-up refuses a longer --max-model-len), inside which sliding-window
attention equals full attention."""
from __future__ import annotations

from pagedserve.model.models.moe_causal_lm import MoeCausalLM


class MixtralForCausalLM(MoeCausalLM):
    pass
