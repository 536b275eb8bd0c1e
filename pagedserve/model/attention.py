"""Paged attention: metadata, the torch reference backend, and backend selection.

KV cache layout, per layer: k_cache, v_cache of shape
    [num_blocks, block_size, num_kv_heads, head_dim]
A token at logical position p of a sequence lives in physical slot
    block_table[p // block_size] * block_size + p % block_size.

The model runner builds one flat batch per step with all decode tokens first
(one per sequence) and then the prefill chunks. Each layer first writes the
new tokens' K/V into their slots, then attends over the cache, so a prefill
chunk sees both the cached prefix and itself (causally).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64, the cache slot of every token in the flat batch
    num_decode: int  # the first num_decode tokens are single-token decodes, one per sequence
    decode_block_tables: torch.Tensor  # [num_decode, max_blocks] int32, padded with 0
    decode_seq_lens: torch.Tensor  # [num_decode] int32, context length including the new token
    prefill_query_start: torch.Tensor  # [P+1] int32, offsets into the prefill tokens (starting at 0)
    prefill_seq_lens: torch.Tensor  # [P] int32, context length after this chunk
    prefill_block_tables: torch.Tensor  # [P, max_blocks] int32
    # Host copies (python ints) so the CPU path never syncs to read shapes.
    decode_max_seq_len: int = 0
    prefill_query_start_list: tuple[int, ...] = (0,)
    prefill_seq_lens_list: tuple[int, ...] = ()

    @property
    def num_prefill(self) -> int:
        return len(self.prefill_seq_lens_list)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter new K/V ([T, KVH, D]) into the paged cache."""
    kvh, d = k.shape[1], k.shape[2]
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, ctx_len: int) -> torch.Tensor:
    """One sequence's first ctx_len cached tokens as [ctx_len, KVH, D]."""
    bs = cache.shape[1]
    nblocks = (ctx_len + bs - 1) // bs
    return cache[block_table[:nblocks].long()].flatten(0, 1)[:ctx_len]


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                               max_seq_len: int | None = None) -> torch.Tensor:
    """q [B, H, D] (one query per sequence) -> out [B, H, D].

    Batched over sequences: gathers each sequence's blocks into a padded
    [B, L, KVH, D] view and masks the padding. One gather per layer keeps the
    CPU path at a few large ops instead of B small ones.
    """
    b, h, d = q.shape
    bs, kvh = k_cache.shape[1], k_cache.shape[2]
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    nblocks = (max_seq_len + bs - 1) // bs
    bt = block_tables[:, :nblocks].long()
    k = k_cache[bt].view(b, nblocks * bs, kvh, d)
    v = v_cache[bt].view(b, nblocks * bs, kvh, d)
    g = h // kvh
    qg = q.view(b, kvh, g, d).float()
    scores = torch.einsum("bkgd,blkd->bkgl", qg, k.float()) * scale
    pos = torch.arange(nblocks * bs, device=q.device)
    mask = pos[None, :] >= seq_lens[:, None].to(pos.dtype)  # [B, L]
    scores.masked_fill_(mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bkgl,blkd->bkgd", probs, v.float())
    return out.reshape(b, h, d).to(q.dtype)


def paged_prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_tables: torch.Tensor, query_start: list[int] | tuple[int, ...],
                                seq_lens: list[int] | tuple[int, ...], scale: float) -> torch.Tensor:
    """q [Tp, H, D] holding several sequences' chunks back to back -> out [Tp, H, D].

    Chunk i covers positions [seq_lens[i] - qlen, seq_lens[i]) of its sequence
    and attends causally to everything cached before and within it.
    """
    out = torch.empty_like(q)
    h = q.shape[1]
    kvh = k_cache.shape[2]
    for i, ctx in enumerate(seq_lens):
        s, e = query_start[i], query_start[i + 1]
        qlen = e - s
        k = gather_context(k_cache, block_tables[i], ctx)
        v = gather_context(v_cache, block_tables[i], ctx)
        qi = q[s:e].transpose(0, 1)  # [H, qlen, D]
        ki = k.transpose(0, 1)
        vi = v.transpose(0, 1)
        if kvh != h:
            ki = ki.repeat_interleave(h // kvh, dim=0)
            vi = vi.repeat_interleave(h // kvh, dim=0)
        if qlen == ctx:
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale)
        else:
            # query j sits at position ctx - qlen + j and sees keys 0..that position
            qpos = torch.arange(ctx - qlen, ctx, device=q.device)
            kpos = torch.arange(ctx, device=q.device)
            mask = kpos[None, :] <= qpos[:, None]
            o = F.scaled_dot_product_attention(qi, ki.to(qi.dtype), vi.to(qi.dtype), attn_mask=mask, scale=scale)
        out[s:e] = o.transpose(0, 1)
    return out


class TorchAttentionBackend:
    """Reference backend: plain torch ops, runs anywhere (the CPU default)."""

    name = "torch"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q [T, H, D], k/v [T, KVH, D] for the flat batch -> [T, H, D]."""
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        nd = meta.num_decode
        if meta.num_prefill == 0:
            return paged_decode_attention_ref(q, k_cache, v_cache, meta.decode_block_tables,
                                              meta.decode_seq_lens, scale, meta.decode_max_seq_len)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = paged_decode_attention_ref(q[:nd], k_cache, v_cache, meta.decode_block_tables,
                                                  meta.decode_seq_lens, scale, meta.decode_max_seq_len)
        out[nd:] = paged_prefill_attention_ref(q[nd:], k_cache, v_cache, meta.prefill_block_tables,
                                               meta.prefill_query_start_list, meta.prefill_seq_lens_list, scale)
        return out


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def get_attention_backend(name: str, device: torch.device):
    """auto: Triton kernels on CUDA when triton imports, else the torch reference."""
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TorchAttentionBackend()
    try:
        from pagedserve.model.triton_attention import TritonAttentionBackend
    except ImportError as e:  # triton missing or kernels not built for this platform
        if name == "triton":
            raise
        import logging

        logging.getLogger(__name__).warning("Triton attention unavailable (%s); using torch reference", e)
        return TorchAttentionBackend()
    return TritonAttentionBackend()
