"""What a decoder family's modules need to be built: the config.json shape plus model-only settings."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from pagedserve.model.hf_config import DecoderShape

if TYPE_CHECKING:
    from torch import nn


@dataclass
class ModelArgs(DecoderShape):
    """DecoderShape plus what the model itself needs; `ModelArgs.from_hf(config)` reads both."""

    def window(self, layer: int) -> int:
        """The sliding window of `layer` (0: global attention)."""
        return self.layer_windows[layer] if self.layer_windows else 0

    rms_norm_eps: float
    rope_theta: float
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    rope_scaling: dict | None = None
    rope_local_theta: float | None = None  # Gemma 3: the sliding-window layers' RoPE base (unscaled)
    partial_rotary_factor: float = 1.0  # the fraction of head_dim RoPE rotates (GLM-4: 0.5)
    rope_freq_factors: list[float] | None = None  # llama.cpp's rope_freqs (GGUF): inv_freq is divided by these
    layer_windows: tuple[int, ...] = ()  # each layer's sliding window, 0: global (empty: all global)
    attn_softcap: float = 0.0  # Gemma 2: tanh soft-cap on the attention scores (0: none)
    final_softcap: float = 0.0  # Gemma 2: tanh soft-cap on the logits (0: none)
    query_pre_attn_scalar: float | None = None  # Gemma: the softmax scale is its -1/2 power, not head_dim's
    hidden_act: str = "silu"  # the MLP's gate activation (Gemma: gelu_pytorch_tanh)
    # Qwen (v1): the training length, and the two mechanisms that act past it (models/qwen.py)
    seq_length: int = 0
    use_dynamic_ntk: bool = False
    use_logn_attn: bool = False
    # Builds the block projections: make_linear(in, out, bias). None: nn.Linear; AWQ checkpoints pass
    # quantization.methods.awq_linear_factory (int8 instead swaps nn.Linear after loading).
    make_linear: Callable[..., nn.Module] | None = field(default=None, repr=False, compare=False)
