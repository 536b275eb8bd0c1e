"""Rotary position embeddings (NeoX / rotate-half layout): the inverse frequencies with the scaling
schemes checkpoints use, and cos/sin tables gathered once per step for every layer."""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from pagedserve.errors import UnsupportedModelError
from pagedserve.model.hf_config import check_rope_supported
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
    if kind in ("longrope", "su"):  # the short factors; LongRotaryEmbedding adds the long ones
        return longrope_inv_freq(args, long=False)
    check_rope_supported(sc)
    raise AssertionError(f"hf_config.ROPE_SCALINGS lists {kind!r} but rope_inv_freq does not implement it")


def longrope_inv_freq(args: ModelArgs, long: bool) -> torch.Tensor:
    """LongRoPE (Phi-3): the base frequencies divided per dimension by the short or the long factors."""
    d, sc = args.head_dim, args.rope_scaling
    factors = sc["long_factor" if long else "short_factor"]
    if len(factors) != d // 2:
        raise UnsupportedModelError(f"rope_scaling {'long' if long else 'short'}_factor has {len(factors)} "
                                    f"entries, expected {d // 2}")
    exps = torch.arange(0, d, 2, dtype=torch.int64).float() / d
    return 1.0 / (torch.tensor(factors, dtype=torch.float32) * args.rope_theta ** exps)


def longrope_scaling(args: ModelArgs) -> float:
    """The factor LongRoPE multiplies cos and sin by (both factor sets): `attention_factor`, else
    sqrt(1 + ln(s) / ln(original length)) with s = factor, else max_position_embeddings / original length."""
    sc = args.rope_scaling
    if sc.get("attention_factor") is not None:
        return float(sc["attention_factor"])
    orig = sc["original_max_position_embeddings"]
    factor = sc.get("factor") or args.max_position_embeddings / orig
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))


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


class LongRotaryEmbedding(nn.Module):
    """LongRoPE's two tables, short factors in rows [0, max_len) and long in [max_len, 2 max_len), both
    scaled by longrope_scaling. As in transformers, a sequence longer than original_max_position_embeddings
    is rotated with the long factors, a shorter one with the short factors. Where decoding carries a
    sequence across that length, the scheduler recomputes it (Scheduler.rope_switch), as transformers
    recomputes its cache, so a sequence's keys never mix the two."""

    def __init__(self, args: ModelArgs, max_len: int):
        super().__init__()
        self.max_len, self.switch = max_len, args.rope_scaling["original_max_position_embeddings"]
        t = torch.arange(max_len, dtype=torch.float32)
        freqs = torch.cat([torch.outer(t, longrope_inv_freq(args, long)) for long in (False, True)])
        emb = torch.cat([freqs, freqs], dim=-1)
        scale = longrope_scaling(args)
        self.register_buffer("cos", emb.cos() * scale, persistent=False)
        self.register_buffer("sin", emb.sin() * scale, persistent=False)

    def at(self, positions: torch.Tensor, dtype: torch.dtype, meta) -> "BoundRope":
        """Decode tokens switch by their own position (graph-safe); every chunk of a prefill by the
        length the whole prefill reaches, so chunking does not change the rotation."""
        long = positions >= self.switch
        if meta.num_prefill:
            lens = torch.tensor(meta.prefill_total_lens_list, device=positions.device)
            starts = meta.prefill_query_start_list
            counts = torch.tensor([b - a for a, b in zip(starts, starts[1:])], device=positions.device)
            long = torch.cat([long[:meta.num_decode], torch.repeat_interleave(lens > self.switch, counts)])
        rows = positions + long.to(positions.dtype) * self.max_len
        return BoundRope(self.cos[rows].unsqueeze(1).to(dtype), self.sin[rows].unsqueeze(1).to(dtype))


class InterleavedRotaryEmbedding(nn.Module):
    """GLM's RoPE: only the first `partial_rotary_factor` of each head rotates, in adjacent pairs
    (x0, x1), (x2, x3)... rather than NeoX's halves; the rest passes through."""

    def __init__(self, args: ModelArgs, max_len: int):
        super().__init__()
        self.dim = int(args.head_dim * args.partial_rotary_factor)
        inv = rope_inv_freq(dataclasses.replace(args, head_dim=self.dim))
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv).repeat_interleave(2, dim=-1)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def at(self, positions: torch.Tensor, dtype: torch.dtype) -> "BoundInterleavedRope":
        return BoundInterleavedRope(self.cos[positions].unsqueeze(1).to(dtype),
                                    self.sin[positions].unsqueeze(1).to(dtype))


class BoundInterleavedRope:
    """InterleavedRotaryEmbedding at fixed positions, called as BoundRope is."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        self.cos, self.sin = cos, sin  # [T, 1, rotary dim]

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        d = self.cos.shape[-1]
        r = x[..., :d]
        pairs = torch.stack((-r[..., 1::2], r[..., 0::2]), dim=-1).flatten(-2)
        return torch.cat((r * self.cos + pairs * self.sin, x[..., d:]), dim=-1)

    def __call__(self, positions, q: torch.Tensor, k: torch.Tensor):
        return self.rotate(q), self.rotate(k)


class BoundRope:
    """RoPE at fixed positions: call it as the module is called (positions are ignored)."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, q_scale: torch.Tensor | None = None):
        self.cos, self.sin = cos, sin  # [T, 1, D], in the model dtype or fp32 (then rotated in fp32)
        self.q_scale = q_scale  # [T, 1, 1] in the model dtype: multiplies the rotated queries (Qwen's logn)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, heads, D] -> rotated, any number of heads (q and k together in one pass)."""
        out = x * self.cos + _rotate_half(x) * self.sin
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def __call__(self, positions, q: torch.Tensor, k: torch.Tensor):
        return self.rotate(q), self.rotate(k)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def ntk_alpha(prompt_len: int, seq_length: int) -> int:
    """Qwen's dynamic-NTK alpha for a prompt of `prompt_len` tokens: 2^ceil(log2(L / seq_length) + 1) - 1,
    at least 1, computed as the reference does (host floats)."""
    return max(2 ** math.ceil(math.log(prompt_len / seq_length, 2) + 1) - 1, 1)


class DynamicNTKRotary(nn.Module):
    """Qwen's dynamic NTK RoPE: each request rotates with base * alpha^(d / (d - 2)), alpha fixed by its
    prompt length (`ntk_alpha`), so one batch mixes bases. The few alphas up to `max_len` each get a row of
    inverse frequencies; `alpha_row[L]` says which row a prompt of L tokens uses. cos/sin are made per
    token in fp32 (position * inv_freq, as the reference's table holds them), so every layer rotates in
    fp32 and rounds once."""

    def __init__(self, args: ModelArgs, max_len: int, seq_length: int, dynamic: bool):
        super().__init__()
        d = args.head_dim
        lens = range(max_len + 1)
        alphas = [ntk_alpha(max(n, 1), seq_length) if dynamic else 1 for n in lens]
        distinct = sorted(set(alphas))
        exps = torch.arange(0, d, 2).float() / d
        inv = [1.0 / ((args.rope_theta * a ** (d / (d - 2))) ** exps) for a in distinct]
        self.register_buffer("inv_freq", torch.stack(inv), persistent=False)  # [n_alpha, D/2] fp32
        row = {a: i for i, a in enumerate(distinct)}
        self.register_buffer("alpha_row", torch.tensor([row[a] for a in alphas]), persistent=False)
        self.alphas = distinct

    def at(self, positions: torch.Tensor, prompt_lens: torch.Tensor, q_scale: torch.Tensor | None) -> BoundRope:
        """positions and each token's request prompt length ([T] int) -> fp32 cos/sin for every layer."""
        inv = self.inv_freq[self.alpha_row[prompt_lens]]  # [T, D/2]
        freqs = positions.float()[:, None] * inv
        emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)
        return BoundRope(emb.cos(), emb.sin(), q_scale)
