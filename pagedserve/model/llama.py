"""Llama-family decoder (Llama, SmolLM2, Mistral, Qwen2, Qwen3) over a paged KV cache.

One class covers the family; config flags switch the differences:
Qwen2's bias on q/k/v, Qwen3's per-head RMSNorm on q and k, tied embeddings,
RoPE scaling. Q, K, V share one matmul and gate/up share another.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.errors import UnsupportedModelError
from pagedserve.model import fused_ops
from pagedserve.model.attention_metadata import AttentionMetadata
from pagedserve.model.hf_config import DecoderShape

# On CUDA, RMSNorm (+ residual add), RoPE and SiLU-and-mul run as one Triton kernel each
# (fused_ops), not ~20 small eager kernels per layer. PAGEDSERVE_FUSED_OPS=0 turns it off (A/B runs).
FUSED_OPS = os.environ.get("PAGEDSERVE_FUSED_OPS", "1") != "0"


def _fused(x: torch.Tensor) -> bool:
    return FUSED_OPS and x.is_cuda


def _input_quant(linear: nn.Module, x: torch.Tensor) -> torch.dtype | None:
    """The 8-bit dtype `linear` quantizes x to per token (an fp8/int8 W8A8 linear on CUDA), or None. The
    norm before it then writes that form itself: one kernel fewer for qkv and gate_up. (SiLU-and-mul
    fused with the quant, one program a row, made decode 5-10% slower on an H200: a row's absmax needs
    the whole row, so one SM computed all 18944 SiLUs twice; down_proj keeps its own quant kernel.)"""
    ask = getattr(linear, "input_quant", None)
    return ask(x) if ask is not None and _fused(x) else None


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
    # quantization.awq_linear_factory (int8 instead swaps nn.Linear after loading).
    make_linear: Callable[..., nn.Module] | None = field(default=None, repr=False, compare=False)


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


# Where a fused projection's parts go for each tensor kind: (dim, offset divisor). nn.Linear weights
# and biases stack along dim 0; AWQ's [in, out] tensors along dim 1, packed ones at 8 values per int32.
_FUSE_DIM = {"qweight": (1, 8), "qzeros": (1, 8), "scales": (1, 1)}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, quant: torch.dtype | None = None):
        """`quant` (fused path only): return the output quantized per token (fused_ops.rms_norm)."""
        if _fused(x):
            return fused_ops.rms_norm(x, self.weight, self.eps, quant)
        dtype = x.dtype
        if dtype == torch.float32:  # one fused op; the same arithmetic as below in fp32
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor,
                    quant: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); on CUDA one kernel that writes the sum into `residual`."""
        if _fused(x):
            return fused_ops.add_rms_norm(x, residual, self.weight, self.eps, quant=quant)
        residual = x + residual
        return self(residual), residual


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


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, backend, tp=None):
        super().__init__()
        self.tp = tp  # TPGroup: args hold this rank's heads; o_proj's output is summed over ranks
        self.nh, self.nkv, self.hd = args.num_heads, args.num_kv_heads, args.head_dim
        self.q_size, self.kv_size = self.nh * self.hd, self.nkv * self.hd
        linear = args.make_linear or nn.Linear
        self.qkv_proj = linear(args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.qkv_bias)
        self.o_proj = linear(self.q_size, args.hidden_size, bias=args.o_bias and (tp is None or tp.rank == 0))
        if args.qk_norm:
            self.q_norm = RMSNorm(self.hd, args.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, args.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.scale = self.hd ** -0.5
        self.backend = backend

    def forward(self, x, positions, rope, kv_cache, meta: AttentionMetadata):
        qkv = self.qkv_proj(x)  # x may be a QuantizedActivation (DecoderLayer)
        t = qkv.shape[0]
        v = qkv[:, self.q_size + self.kv_size:].view(t, self.nkv, self.hd)
        if self.q_norm is None and isinstance(rope, BoundRope) and _fused(qkv):
            # q and k rotated in place inside the fused projection's output, one kernel
            fused_ops.rope_(qkv[:, :self.q_size + self.kv_size].view(t, self.nh + self.nkv, self.hd),
                            rope.cos, rope.sin)
            q = qkv[:, :self.q_size].view(t, self.nh, self.hd)
            k = qkv[:, self.q_size:self.q_size + self.kv_size].view(t, self.nkv, self.hd)
        elif self.q_norm is None and isinstance(rope, BoundRope):
            # q and k are adjacent in the fused projection: rotate them as one [T, H + KVH, D] tensor
            qk = rope.rotate(qkv[:, :self.q_size + self.kv_size].view(t, self.nh + self.nkv, self.hd))
            q, k = qk[:, :self.nh], qk[:, self.nh:]
        else:
            q, k, _ = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.view(t, self.nh, self.hd)
            k = k.view(t, self.nkv, self.hd)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = rope(positions, q, k)
        out = self.backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        out = self.o_proj(out.reshape(t, self.q_size))
        return out if self.tp is None else self.tp.all_reduce(out)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, tp=None):
        super().__init__()
        self.inter = args.intermediate_size
        self.tp = tp  # row-parallel down_proj: its bias lives on rank 0 only, added once by the all-reduce
        linear = args.make_linear or nn.Linear
        self.gate_up_proj = linear(args.hidden_size, 2 * self.inter, bias=args.mlp_bias)
        self.down_proj = linear(self.inter, args.hidden_size, bias=args.mlp_bias and (tp is None or tp.rank == 0))

    def forward(self, x):
        gate_up = self.gate_up_proj(x)
        if _fused(gate_up):
            out = self.down_proj(fused_ops.silu_mul(gate_up))
        else:
            gate, up = gate_up.split(self.inter, dim=-1)
            out = self.down_proj(F.silu(gate).mul_(up))
        return out if self.tp is None else self.tp.all_reduce(out)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, backend, tp=None):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, backend, tp)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args, tp)

    def forward(self, x, residual, positions, rope, kv_cache, meta):
        """Carries the residual stream apart from the sublayer output, so each add fuses into the next
        norm: returns (mlp output, residual); the layer's output is their sum."""
        quant = _input_quant(self.self_attn.qkv_proj, x)
        if residual is None:  # first layer
            residual, h = x, self.input_layernorm(x, quant)
        else:
            h, residual = self.input_layernorm.add_forward(x, residual, quant)
        h = self.self_attn(h, positions, rope, kv_cache, meta)
        h, residual = self.post_attention_layernorm.add_forward(h, residual, _input_quant(self.mlp.gate_up_proj, h))
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, args: ModelArgs, backend, max_len: int, tp=None):
        """`tp` (a TPGroup) builds this rank's shard: `args` stay the full model's, `self.args` the local shapes."""
        super().__init__()
        self.tp, self.full_args = tp, args
        if tp is not None:
            args = tp.shard.local_args(args)
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, backend, tp) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rope = RotaryEmbedding(args, max_len)
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list, meta) -> torch.Tensor:
        """input_ids/positions [T] -> final hidden states [T, hidden]."""
        x = self.embed_tokens(input_ids) if self.tp is None else self.tp.embed(self.embed_tokens, input_ids)
        rope = self.rope.at(positions, x.dtype)  # the same for every layer
        residual = None
        for layer, cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, positions, rope, cache, meta)
        return self.norm.add_forward(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:  # a module call, so the runner may swap in a faster linear
            logits = self.lm_head(hidden)
        else:
            logits = F.linear(hidden, self.embed_tokens.weight)
        if self.tp is not None:  # this rank's vocabulary slice -> the full row, on rank 0
            logits = self.tp.gather_logits(logits)
        return logits.float()

    # -- weights ---------------------------------------------------------
    def load_hf_weights(self, tensors) -> None:
        """Load HF-named tensors (an iterable of (name, tensor)), fusing q/k/v and gate/up.

        AWQ tensors (qweight/qzeros/scales) are stored [in, out]: they fuse along dim 1, and the
        packed ones (8 int4 values per int32 column) at a 1/8 offset."""
        params = dict(self.named_parameters())
        fused = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "gate_proj": 0, "up_proj": 1}
        loaded = set()
        a = self.args
        qkv_sizes = [a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.num_kv_heads * a.head_dim]
        for name, w in tensors:
            if name.startswith("model."):
                name = name[len("model."):]
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: some checkpoints still store a copy
            if self.tp is not None:  # this rank's slice of the tensor (None: another rank holds it)
                w = self.tp.shard.shard_hf_tensor(name, w)
                if w is None:
                    continue
            parts = name.split(".")
            target, offset, size = name, 0, None
            if len(parts) >= 2 and parts[-2] in fused:
                proj, idx = parts[-2], fused[parts[-2]]
                if proj in ("q_proj", "k_proj", "v_proj"):
                    target = ".".join(parts[:-2] + ["qkv_proj", parts[-1]])
                    offset, size = sum(qkv_sizes[:idx]), qkv_sizes[idx]
                else:
                    target = ".".join(parts[:-2] + ["gate_up_proj", parts[-1]])
                    offset, size = idx * a.intermediate_size, a.intermediate_size
            p = params.get(target)
            if p is None:
                raise UnsupportedModelError(f"checkpoint tensor {name!r} has no place in the model")
            dim, div = _FUSE_DIM.get(parts[-1], (0, 1))
            if size is not None and (offset % div or size % div):
                raise UnsupportedModelError(
                    f"checkpoint tensor {name!r}: a fused output slice of {size} is not a multiple of {div}")
            with torch.no_grad():
                dst = p if size is None else p.narrow(dim, offset // div, size // div)
                if parts[-1] == "weight_scale" and w.numel() == 1:  # fp8 per-tensor scale: one for every row
                    w = w.reshape(()).expand(dst.shape)
                if tuple(dst.shape) != tuple(w.shape):
                    raise UnsupportedModelError(
                        f"checkpoint tensor {name!r} has shape {tuple(w.shape)}, expected {tuple(dst.shape)}"
                    )
                dst.copy_(w)
            loaded.add((target, offset))
        expected = set()
        for pname, p in params.items():
            if ".qkv_proj." in pname:
                expected |= {(pname, sum(qkv_sizes[:i])) for i in range(3)}
            elif ".gate_up_proj." in pname:
                expected |= {(pname, 0), (pname, a.intermediate_size)}
            else:
                expected.add((pname, 0))
        missing = sorted({n for n, _ in expected - loaded})
        if missing:
            raise UnsupportedModelError(
                f"checkpoint is missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}"
            )
