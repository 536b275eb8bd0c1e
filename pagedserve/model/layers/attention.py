"""Paged attention: the torch backend (the CPU default) and backend selection.

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

from pagedserve.model.attention_metadata import AttentionMetadata
from pagedserve.quantization.fp8 import FP8, quantize_kv
from pagedserve.model.layers.shared_prefix import SharedPrefix, plan_shared, shared_prefix_decode


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Scatter new K/V ([T, KVH, D]) into the paged cache. An fp8 cache stores clamp(x / scale) in e4m3
    (index_copy_ has no float8 kernel on CPU, so the bytes are copied through uint8 views)."""
    kvh, d = k.shape[1], k.shape[2]
    if k_cache.dtype == FP8:
        k_cache.view(torch.uint8).view(-1, kvh, d).index_copy_(0, slot_mapping, quantize_kv(k, k_scale).view(torch.uint8))
        v_cache.view(torch.uint8).view(-1, kvh, d).index_copy_(0, slot_mapping, quantize_kv(v, v_scale).view(torch.uint8))
        return
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Copy the listed blocks ([N] int64) out of the cache as [N * block_size, KVH, D].

    index_select over whole blocks viewed as rows: one contiguous memcpy per block, which on CPU is
    several times faster than advanced indexing (`cache[ids]`) of the 4-d tensor. `out` ([N, row]),
    when given, is reused instead of allocating (and page-faulting in) a fresh tensor.
    """
    nb, bs, kvh, d = cache.shape
    rows = cache.view(nb, bs * kvh * d)
    if out is None:
        out = torch.index_select(rows, 0, block_ids)
    else:
        torch.index_select(rows, 0, block_ids, out=out)
    return out.view(-1, kvh, d)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, ctx_len: int) -> torch.Tensor:
    """One sequence's first ctx_len cached tokens as [ctx_len, KVH, D]."""
    bs = cache.shape[1]
    nblocks = (ctx_len + bs - 1) // bs
    return gather_blocks(cache, block_table[:nblocks].long())[:ctx_len]


# Cost of one more decode group per layer (a few extra op launches), in gathered blocks: a group
# pays off when it saves more padding than this.
GROUP_OVERHEAD_BLOCKS = 8


def group_by_length(nblocks: list[int], overhead: int = GROUP_OVERHEAD_BLOCKS) -> list[list[int]]:
    """Split decode rows into groups padded separately, minimising gathered blocks + overhead per group.

    Each group is padded to its longest row, so one long sequence no longer makes every short one
    gather (and attend over) as many blocks as it has. Optimal over contiguous ranges of the sorted
    distinct lengths (a small DP on host ints); rows keep their original index.
    """
    by_len: dict[int, list[int]] = {}
    for i, n in enumerate(nblocks):
        by_len.setdefault(n, []).append(i)
    vals = sorted(by_len, reverse=True)  # longest first
    u = len(vals)
    if u == 1:
        return [list(range(len(nblocks)))]
    counts = [len(by_len[v]) for v in vals]
    best = [0] + [None] * u  # best[j]: cost of grouping the j longest distinct lengths
    cut = [0] * (u + 1)
    for j in range(1, u + 1):
        rows = 0
        for a in range(j, 0, -1):  # the last group spans distinct lengths a..j, padded to vals[a-1]
            rows += counts[a - 1]
            c = best[a - 1] + vals[a - 1] * rows + overhead
            if best[j] is None or c < best[j]:
                best[j], cut[j] = c, a - 1
    groups = []
    j = u
    while j > 0:
        a = cut[j]
        groups.append([i for v in vals[a:j] for i in by_len[v]])
        j = a
    return groups[::-1]


@dataclass
class DecodeGroup:
    rows: torch.Tensor | None  # [n] int64 rows of the decode batch, None: all rows in order
    ids: torch.Tensor  # [n * nb] int64 block ids to gather, nb = blocks of the group's longest sequence
    mask: torch.Tensor  # [n, 1, 1, nb * block_size] additive: 0 inside a sequence, -inf past its end


@dataclass
class DecodePlan:
    """What every layer's decode attention needs, built once per step (`decode_plan`)."""

    groups: list[DecodeGroup]
    k_buf: torch.Tensor | None = None  # [max gathered blocks, block_size * KVH * D] reused by all layers
    v_buf: torch.Tensor | None = None


def _group_tensors(block_tables: torch.Tensor, seq_lens: torch.Tensor, rows: torch.Tensor | None, max_len: int,
                   block_size: int, dtype: torch.dtype) -> DecodeGroup:
    nb = (max_len + block_size - 1) // block_size
    bt = block_tables if rows is None else block_tables.index_select(0, rows)
    lens = seq_lens if rows is None else seq_lens.index_select(0, rows)
    ids = bt[:, :nb].reshape(-1).long()
    pos = torch.arange(nb * block_size, device=block_tables.device)
    past_end = pos[None, :] >= lens[:, None].to(pos.dtype)  # [n, L]
    mask = torch.zeros(bt.shape[0], 1, 1, nb * block_size, dtype=dtype, device=block_tables.device)
    mask.masked_fill_(past_end[:, None, None, :], float("-inf"))
    return DecodeGroup(rows, ids, mask)


def decode_plan(block_tables: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int, block_size: int,
                dtype: torch.dtype, cache: torch.Tensor | None = None,
                seq_lens_list: list[int] | tuple[int, ...] | None = None) -> DecodePlan:
    """Block ids and padding masks per group of rows (one group unless the host lengths
    `seq_lens_list` are given and splitting pays), and, given a layer's cache, reusable gather
    buffers of its dtype and row size."""
    if seq_lens_list and len(seq_lens_list) > 1:
        nblocks = [max(1, (n + block_size - 1) // block_size) for n in seq_lens_list]
        parts = group_by_length(nblocks)
    else:
        parts = None
    if parts is None or len(parts) == 1:
        groups = [_group_tensors(block_tables, seq_lens, None, max_seq_len, block_size, dtype)]
    else:
        groups = [_group_tensors(block_tables, seq_lens, torch.tensor(rows, device=block_tables.device),
                                 max(1, max(seq_lens_list[i] for i in rows)), block_size, dtype)
                  for rows in parts]
    plan = DecodePlan(groups)
    if cache is not None:
        row = cache[0].numel()
        most = max(g.ids.numel() for g in groups)
        plan.k_buf = torch.empty(most, row, dtype=cache.dtype, device=cache.device)
        plan.v_buf = torch.empty_like(plan.k_buf)
    return plan


def _decode_group(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, grp: DecodeGroup, scale: float,
                  k_buf: torch.Tensor | None, v_buf: torch.Tensor | None) -> torch.Tensor:
    b, h, d = q.shape
    kvh = k_cache.shape[2]
    seq = grp.mask.shape[-1]
    n = grp.ids.numel()
    k = gather_blocks(k_cache, grp.ids, None if k_buf is None else k_buf[:n])
    v = gather_blocks(v_cache, grp.ids, None if v_buf is None else v_buf[:n])
    k = k.view(b, seq, kvh, d).transpose(1, 2)  # [n, KVH, L, D] (strided view)
    v = v.view(b, seq, kvh, d).transpose(1, 2)
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    out = F.scaled_dot_product_attention(q.reshape(b, kvh, h // kvh, d), k, v, attn_mask=grp.mask, scale=scale)
    return out.reshape(b, h, d)


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                               max_seq_len: int | None = None, plan: DecodePlan | None = None) -> torch.Tensor:
    """q [B, H, D] (one query per sequence) -> out [B, H, D].

    Batched over sequences: gathers the sequences' blocks into a padded [n, L, KVH, D] tensor (one
    index_select per cache) and runs one fused SDPA with an additive padding mask, per group of
    similar lengths (see `decode_plan`). GQA without repeating K/V: the g query heads that share a
    KV head become g query rows of that head. `plan` is `decode_plan(...)` for these tables, when
    the caller already has it.
    """
    if plan is None:
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max())
        plan = decode_plan(block_tables, seq_lens, max_seq_len, k_cache.shape[1], q.dtype)
    if len(plan.groups) == 1 and plan.groups[0].rows is None:
        return _decode_group(q, k_cache, v_cache, plan.groups[0], scale, plan.k_buf, plan.v_buf)
    out = torch.empty_like(q)
    for grp in plan.groups:
        o = _decode_group(q.index_select(0, grp.rows), k_cache, v_cache, grp, scale, plan.k_buf, plan.v_buf)
        out.index_copy_(0, grp.rows, o)
    return out


def paged_prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_tables: torch.Tensor, query_start: list[int] | tuple[int, ...],
                                seq_lens: list[int] | tuple[int, ...], scale: float,
                                k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
    """q [Tp, H, D] holding several sequences' chunks back to back -> out [Tp, H, D].

    Chunk i covers positions [seq_lens[i] - qlen, seq_lens[i]) of its sequence and attends causally
    to everything cached before and within it. When the chunk's own K/V ([Tp, KVH, D], already
    written to the cache) are passed as k/v, a chunk with no cached context attends to them directly
    instead of gathering them back. SDPA gets 4-d inputs (its fused CPU kernel; 3-d inputs fall back
    to the unfused math path) and handles GQA itself.
    """
    h = q.shape[1]
    kvh = k_cache.shape[2]
    gqa = kvh != h
    n = len(seq_lens)
    out = None if n == 1 else torch.empty_like(q)
    for i, ctx in enumerate(seq_lens):
        s, e = query_start[i], query_start[i + 1]
        qlen = e - s
        qi = q[s:e].transpose(0, 1).unsqueeze(0)  # [1, H, qlen, D]
        if qlen == ctx and k is not None:
            ki, vi = k[s:e], v[s:e]
        else:
            ki = gather_context(k_cache, block_tables[i], ctx)
            vi = gather_context(v_cache, block_tables[i], ctx)
        ki = ki.transpose(0, 1).unsqueeze(0).to(qi.dtype)  # [1, KVH, ctx, D]
        vi = vi.transpose(0, 1).unsqueeze(0).to(qi.dtype)
        if qlen == ctx:
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            # query j sits at position ctx - qlen + j and sees keys 0..that position
            qpos = torch.arange(ctx - qlen, ctx, device=q.device)
            kpos = torch.arange(ctx, device=q.device)
            mask = kpos[None, :] <= qpos[:, None]
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale, enable_gqa=gqa)
        o = o[0].transpose(0, 1)  # [qlen, H, D]
        if out is None:
            return o
        out[s:e] = o
    return out


class TorchAttentionBackend:
    """Reference backend: plain torch ops, runs anywhere (the CPU default).

    An fp8 KV cache (--kv-cache-dtype fp8) holds K / k_scale and V / v_scale in e4m3; reads convert to
    the query's dtype and fold the scales in: softmax(q.(k_scale k8)) (v_scale v8) = v_scale x
    attention with softmax scale x k_scale. Per-tensor scales, 1.0 unless calibrated (vLLM's default)."""

    name = "torch"
    k_scale: float = 1.0
    v_scale: float = 1.0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q [T, H, D], k/v [T, KVH, D] for the flat batch -> [T, H, D]."""
        if k_cache.dtype == FP8:
            write_kv(k, v, k_cache, v_cache, meta.slot_mapping, self.k_scale, self.v_scale)
            out = self._attend(q, k, v, k_cache, v_cache, meta, scale * self.k_scale)
            return out if self.v_scale == 1.0 else out * self.v_scale
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return self._attend(q, k, v, k_cache, v_cache, meta, scale)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        nd = meta.num_decode
        decode = None
        if nd:
            key = ("decode_plan", q.dtype, k_cache.dtype, k_cache[0].shape)
            plan = meta.derived.get(key)
            if plan is None:  # the first layer of this step
                shared = plan_shared(meta.decode_block_tables, meta.decode_seq_lens, meta.decode_seq_lens_list,
                                     k_cache.shape[1], q.dtype) if meta.decode_seq_lens_list else None
                plan = meta.derived[key] = shared or decode_plan(
                    meta.decode_block_tables, meta.decode_seq_lens, meta.decode_max_seq_len, k_cache.shape[1],
                    q.dtype, k_cache, meta.decode_seq_lens_list)
            if isinstance(plan, SharedPrefix):  # the rows share a cached prefix: read it once, not once per row
                decode = shared_prefix_decode(q[:nd], k_cache, v_cache, plan, scale)
            else:
                decode = paged_decode_attention_ref(q[:nd], k_cache, v_cache, meta.decode_block_tables,
                                                    meta.decode_seq_lens, scale, meta.decode_max_seq_len, plan)
            if meta.num_prefill == 0:
                return decode
        prefill = paged_prefill_attention_ref(q[nd:], k_cache, v_cache, meta.prefill_block_tables,
                                              meta.prefill_query_start_list, meta.prefill_seq_lens_list, scale,
                                              *((k[nd:], v[nd:]) if k.dtype == k_cache.dtype else ()))
        if decode is None:
            return prefill
        return torch.cat([decode, prefill])


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def get_attention_backend(name: str, device: torch.device):
    """auto: Triton kernels on CUDA when triton imports, else the torch reference."""
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TorchAttentionBackend()
    try:
        from pagedserve.model.kernels.triton_attention import TritonAttentionBackend
    except ImportError as e:  # triton missing or kernels not built for this platform
        if name == "triton":
            raise
        import logging

        logging.getLogger(__name__).warning("Triton attention unavailable (%s); using torch reference", e)
        return TorchAttentionBackend()
    return TritonAttentionBackend()
