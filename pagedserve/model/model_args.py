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
    rms_norm_eps: float
    rope_theta: float
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    rope_scaling: dict | None = None
    rope_freq_factors: list[float] | None = None  # llama.cpp's rope_freqs (GGUF): inv_freq is divided by these
    # Builds the block projections: make_linear(in, out, bias). None: nn.Linear; AWQ checkpoints pass
    # quantization.methods.awq_linear_factory (int8 instead swaps nn.Linear after loading).
    make_linear: Callable[..., nn.Module] | None = field(default=None, repr=False, compare=False)
