"""Self-attention of a decoder layer: one fused QKV matmul, RoPE, the paged attention backend, o_proj."""
from __future__ import annotations

from torch import nn

from pagedserve.model.attention_metadata import AttentionMetadata
from pagedserve.model.kernels import fused_ops
from pagedserve.model.layers.norm import RMSNorm
from pagedserve.model.layers.rotary import BoundRope
from pagedserve.model.model_args import ModelArgs


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
        if self.q_norm is None and isinstance(rope, BoundRope) and fused_ops.enabled(qkv):
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
