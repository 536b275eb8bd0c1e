"""Rotary position embeddings (NeoX / rotate-half layout): the inverse frequencies with the scaling
schemes checkpoints use, and cos/sin tables gathered once per step for every layer."""
from __future__ import annotations

import math

import torch
from torch import nn

from pagedserve.errors import UnsupportedModelError
from pagedserve.model.model_args import ModelArgs


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies, with the RoPE scaling schemes Llama/Qwen checkpoints use."""
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if args.rope_freq_factors is not None:
        if len(args.rope_freq_factors) != d // 2:
            raise UnsupportedModelError(
                f"rope_freq_factors has {len(args.rope_freq_factors)} entries, expected {d // 2}")
        inv = inv / torch.tensor(args.rope_freq_factors, dtype=torch.float32)
    sc = args.rope_scaling
    if not sc:
        return inv
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(sc["factor"])
    if kind == "llama3":
        factor = sc["factor"]
        low, high = sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old_ctx = sc["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise UnsupportedModelError(f"rope_scaling type {kind!r} is not supported (supported: linear, llama3)")


class RotaryEmbedding(nn.Module):
    def __init__(self, args: ModelArgs, max_len: int):
        super().__init__()
        t = torch.arange(max_len, dtype=torch.float32)
        freqs = torch.outer(t, rope_inv_freq(args))
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        return self.at(positions, q.dtype)(positions, q, k)

    def at(self, positions: torch.Tensor, dtype: torch.dtype) -> "BoundRope":
        """cos/sin gathered once for a step's positions, then shared by every layer."""
        return BoundRope(self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype))


class BoundRope:
    """RoPE at fixed positions: call it as the module is called (positions are ignored)."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        self.cos, self.sin = cos, sin  # [T, 1, D]

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, heads, D] -> rotated, any number of heads (q and k together in one pass)."""
        return x * self.cos + _rotate_half(x) * self.sin

    def __call__(self, positions, q: torch.Tensor, k: torch.Tensor):
        return self.rotate(q), self.rotate(k)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)

