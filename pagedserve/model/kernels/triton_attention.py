"""Paged attention in Triton: KV-cache write, decode (GQA, split-K) and prefill (varlen, causal).

Same contract as `TorchAttentionBackend` in attention.py: the KV cache of one
layer is a pair of tensors [num_blocks, block_size, num_kv_heads, head_dim],
token p of a sequence lives in slot block_table[p // block_size] * block_size +
p % block_size, and the flat batch holds the decode tokens first, then the
prefill chunks.

Kernels
-------
* ``_write_kv_kernel``, grid (T, KVH): copies one token's K and V head into
  its slot; a negative slot (padding) is skipped.
* ``_decode_kernel``, grid (B, KVH, S): one program per (sequence, kv head,
  split). It loads the G = H / KVH query heads of its group as a [G_PAD, D]
  tile (G_PAD >= 16 so tl.dot can use tensor cores; the padding rows are
  masked), walks its share of the context in BLOCK_N-token tiles gathered
  through the block table (a tile may span several KV blocks or be a part of
  one), and keeps an online softmax in fp32. With S == 1 it writes the
  normalised output directly; with S > 1 each split covers an equal,
  BLOCK_N-aligned share of its own sequence and writes an unnormalised partial
  (acc, running max, running sum) that ``_decode_reduce_kernel`` (grid (B, H))
  merges. The grid depends only on (B, KVH, S), never on sequence lengths, so a
  CUDA graph captured for a batch size stays valid when the lengths change.
* ``_prefill_kernel``, grid (H, cdiv(max_qlen, BLOCK_M), P): one program per
  query tile of one prefill chunk and one head. Heads vary fastest, so the G
  heads that read the same K/V run side by side and share it through L2; the
  query tiles of a chunk go last-first, so the longest (causal) tiles start
  first and the short ones fill the tail (H200, one 4,096-token prompt: 316 ->
  352 TFLOP/s; neutral on short prompts; results/prefill_attention_h200.json).
  The chunk covers positions [ctx - qlen, ctx) of its sequence; the tile first
  attends without masks to the keys that every query of the tile sees (the
  cached prefix and the part of the chunk before the tile), then with a causal
  mask up to its last query.
  Tiles past the end of a shorter chunk return at once.

All softmax arithmetic is in fp32 (exp2 with the scale folded into log2 units);
inputs may be fp16, bf16 or fp32 (fp32 matmuls use IEEE precision, not TF32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.model.attention_metadata import AttentionMetadata

_LOG2E = 1.4426950408889634


@triton.jit
def _mm(a, b, DOT_FP32: tl.constexpr):
    """a @ b with an fp32 accumulator. DOT_FP32: both operands in fp32 at IEEE precision
    (fp32 inputs: no TF32; under the interpreter: see `_dot_fp32`)."""
    if DOT_FP32:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        r = tl.dot(a, b)
    return r


# --------------------------------------------------------------------------
# KV-cache write
# --------------------------------------------------------------------------
@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch, k_scale, v_scale,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, D_PAD: tl.constexpr, FP8: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        d = tl.arange(0, D_PAD)
        dmask = d < HEAD_DIM
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        dst = blk * stride_cb + off * stride_cs + h * stride_ch + d
        kv = tl.load(k_ptr + t.to(tl.int64) * stride_kt + h * stride_kh + d, mask=dmask)
        vv = tl.load(v_ptr + t.to(tl.int64) * stride_vt + h * stride_vh + d, mask=dmask)
        if FP8:  # e4m3 stores x / scale, saturated at +-448 (an overflow must not become NaN)
            kv = tl.minimum(tl.maximum(kv.to(tl.float32) / k_scale, -448.0), 448.0)
            vv = tl.minimum(tl.maximum(vv.to(tl.float32) / v_scale, -448.0), 448.0)
        tl.store(k_cache_ptr + dst, kv.to(k_cache_ptr.dtype.element_ty), mask=dmask)
        tl.store(v_cache_ptr + dst, vv.to(v_cache_ptr.dtype.element_ty), mask=dmask)


# --------------------------------------------------------------------------
# Decode: one query token per sequence
# --------------------------------------------------------------------------
# Ints that change from step to step (block-table width, split count) are not specialised on:
# Triton would compile a variant the first time one is divisible by 16 or equals 1, in the middle
# of serving (measured: ~1 s stalls on the first large mixed batch).
@triton.jit(do_not_specialize=["stride_bt", "num_splits"])
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, seq_lens_ptr,
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    qk_scale,  # softmax scale * log2(e) (* k_scale for an fp8 cache)
    v_scale,  # 1.0, or an fp8 cache's V scale: multiplies the output
    stride_qb, stride_qh,
    stride_ob, stride_oh,
    stride_cb, stride_cs, stride_ch,
    stride_bt,
    num_splits,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, DOT_FP32: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + b)
    # Each split takes an equal, BLOCK_N-aligned share of this sequence.
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    g = tl.arange(0, G_PAD)
    gmask = g < GROUP
    heads = kvh * GROUP + g
    d = tl.arange(0, D_PAD)
    dmask = d < HEAD_DIM
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    n_off = tl.arange(0, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + n_off
        nmask = pos < end
        phys = tl.load(bt_row + pos // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
        kv_off = phys * stride_cb + (pos % BLOCK_SIZE) * stride_cs + kvh * stride_ch
        kvmask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_cache_ptr + kv_off[:, None] + d[None, :], mask=kvmask, other=0.0).to(q.dtype)
        v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :], mask=kvmask, other=0.0).to(q.dtype)
        s = _mm(q, tl.trans(k), DOT_FP32)
        s = s * qk_scale
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        pv = _mm(p.to(v.dtype), v, DOT_FP32)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    omask = gmask[:, None] & dmask[None, :]
    acc = acc * v_scale
    if SPLIT:
        # partials laid out [B, H, S, (D)], contiguous
        row = (b.to(tl.int64) * NUM_HEADS + heads) * num_splits + split
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=omask)
        tl.store(part_m_ptr + row, m_i, mask=gmask)
        tl.store(part_l_ptr + row, l_i, mask=gmask)
    else:
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # seq_len 0 (padding) -> zeros, not NaN
        out = acc / l_safe[:, None]
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    part_acc_ptr, part_m_ptr, part_l_ptr, out_ptr,
    stride_ob, stride_oh, num_splits,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, S_PAD)
    smask = s < num_splits
    d = tl.arange(0, D_PAD)
    dmask = d < HEAD_DIM
    row = (b.to(tl.int64) * NUM_HEADS + h) * num_splits + s
    m = tl.load(part_m_ptr + row, mask=smask, other=float("-inf"))
    l = tl.load(part_l_ptr + row, mask=smask, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # all splits empty
    w = tl.exp2(m - m_max)  # empty split: exp2(-inf) = 0
    acc = tl.load(part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :],
                  mask=smask[:, None] & dmask[None, :], other=0.0)
    num = tl.sum(acc * w[:, None], 0)
    den = tl.sum(l * w, 0)
    den = tl.where(den > 0.0, den, 1.0)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + d,
             (num / den).to(out_ptr.dtype.element_ty), mask=dmask)


# --------------------------------------------------------------------------
# Prefill / chunked prefill over the paged cache
# --------------------------------------------------------------------------
@triton.jit(do_not_specialize=["stride_bt"])
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, q_start_ptr, seq_lens_ptr, out_ptr,
    qk_scale, v_scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch,
    stride_bt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    h = tl.program_id(0)
    mt = tl.num_programs(1) - 1 - tl.program_id(1)
    i = tl.program_id(2)
    kvh = h // GROUP

    q_begin = tl.load(q_start_ptr + i)
    qlen = tl.load(q_start_ptr + i + 1) - q_begin
    m0 = mt * BLOCK_M
    if m0 < qlen:
        ctx = tl.load(seq_lens_ptr + i)
        first_pos = ctx - qlen  # absolute position of the chunk's first query

        m_off = m0 + tl.arange(0, BLOCK_M)
        mmask = m_off < qlen
        qpos = first_pos + m_off
        d = tl.arange(0, D_PAD)
        dmask = d < HEAD_DIM
        q_rows = (q_begin + m_off).to(tl.int64)
        q = tl.load(q_ptr + q_rows[:, None] * stride_qt + h * stride_qh + d[None, :],
                    mask=mmask[:, None] & dmask[None, :], other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        bt_row = bt_ptr + i.to(tl.int64) * stride_bt
        n_off = tl.arange(0, BLOCK_N)

        # Keys every query of this tile sees: [0, first query position of the tile), whole tiles only.
        full_end = ((first_pos + m0) // BLOCK_N) * BLOCK_N
        # Last key any query of this tile sees, + 1.
        kv_end = tl.minimum(first_pos + m0 + BLOCK_M, ctx)

        for n0 in range(0, full_end, BLOCK_N):
            pos = n0 + n_off
            phys = tl.load(bt_row + pos // BLOCK_SIZE).to(tl.int64)
            kv_off = phys * stride_cb + (pos % BLOCK_SIZE) * stride_cs + kvh * stride_ch
            k = tl.load(k_cache_ptr + kv_off[:, None] + d[None, :], mask=dmask[None, :], other=0.0).to(q.dtype)
            v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :], mask=dmask[None, :], other=0.0).to(q.dtype)
            s = _mm(q, tl.trans(k), DOT_FP32)
            s = s * qk_scale
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            pv = _mm(p.to(v.dtype), v, DOT_FP32)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        for n0 in range(full_end, kv_end, BLOCK_N):
            pos = n0 + n_off
            nmask = pos < kv_end
            phys = tl.load(bt_row + pos // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
            kv_off = phys * stride_cb + (pos % BLOCK_SIZE) * stride_cs + kvh * stride_ch
            kvmask = nmask[:, None] & dmask[None, :]
            k = tl.load(k_cache_ptr + kv_off[:, None] + d[None, :], mask=kvmask, other=0.0).to(q.dtype)
            v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :], mask=kvmask, other=0.0).to(q.dtype)
            s = _mm(q, tl.trans(k), DOT_FP32)
            s = s * qk_scale
            causal = (pos[None, :] <= qpos[:, None]) & nmask[None, :]
            s = tl.where(causal, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # rows that have seen no key yet keep m = -inf; avoid (-inf) - (-inf)
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_sub)
            p = tl.exp2(s - m_sub[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            pv = _mm(p.to(v.dtype), v, DOT_FP32)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc * v_scale / l_safe[:, None]
        tl.store(out_ptr + q_rows[:, None] * stride_ot + h * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])


# --------------------------------------------------------------------------
# Host wrappers
# --------------------------------------------------------------------------
def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.stride() != v_cache.stride() or k_cache.shape != v_cache.shape:
        raise ValueError("k_cache and v_cache must have the same shape and strides")
    if k_cache.stride(-1) != 1:
        raise ValueError("the KV cache's head_dim must be contiguous")


def _dot_fp32(dtype: torch.dtype) -> bool:
    """fp32 inputs keep IEEE fp32 matmuls (no TF32). Triton's CPU interpreter multiplies
    bf16 tl.dot operands as raw bits (triton 3.9), so there every dot runs on
    fp32 copies; a product of two bf16/fp16 values is exact in fp32, so this
    matches the tensor-core result up to summation order."""
    return dtype == torch.float32 or _INTERPRETED


def write_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Scatter new K/V ([T, KVH, D]) into the paged cache; slots < 0 are skipped. An fp8 (e4m3) cache
    stores clamp(x / scale); the attention kernels multiply the scales back in."""
    t, kvh, d = k.shape
    if t == 0:
        return
    _check_cache(k_cache, v_cache)
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    _write_kv_kernel[(t, kvh)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), float(k_scale), float(v_scale),
        HEAD_DIM=d, BLOCK_SIZE=k_cache.shape[1], D_PAD=triton.next_power_of_2(d),
        FP8=k_cache.dtype == torch.float8_e4m3fn,
    )


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def choose_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, device: torch.device,
                      min_tokens_per_split: int = 64, max_splits: int = 64) -> int:
    """Split the context when (sequences x kv heads) alone would leave the GPU's SMs idle.

    Aims at about 3 programs per SM, each with at least one 64-token tile. On an
    H100 (132 SMs, 4 KV heads) this gave within a few % of the best split count
    found by sweeping 1..64 (benchmarks/gpu_attention.py --tune): batch 1: 16-64
    splits, batch 8: 8-16, batch 32: 4, batch 64: 2, batch >= 128: 1.
    """
    ctas = batch * num_kv_heads
    target = 3 * _sm_count(device)
    if ctas >= target:
        return 1
    by_len = max(1, max_seq_len // min_tokens_per_split)
    return max(1, min(triton.cdiv(target, ctas), by_len, max_splits))


def _dot_block(d_pad: int, dtype: torch.dtype) -> int:
    """Default tile: 64 tokens for head_dim <= 128 in 16-bit types, 32 otherwise
    (fp32 tiles take twice the registers and shared memory)."""
    return 64 if d_pad <= 128 and dtype != torch.float32 else 32


def paged_decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                                  max_seq_len: int | None = None, num_splits: int | None = None,
                                  block_n: int | None = None, out: torch.Tensor | None = None,
                                  num_warps: int = 4, num_stages: int = 3,
                                  k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """q [B, H, D] (one query per sequence) -> out [B, H, D]; see `paged_decode_attention_ref`.
    An fp8 cache is read as (k_scale x K, v_scale x V), converted to q's dtype in registers.

    num_splits: None picks one from the batch size and max_seq_len (a host int;
    None falls back to the block table's width, an upper bound that needs no
    device sync). Pass a fixed value when capturing CUDA graphs.
    """
    b, h, d = q.shape
    if out is None:
        out = torch.empty_like(q)
    if b == 0:
        return out
    _check_cache(k_cache, v_cache)
    q = _last_dim_contiguous(q)
    bs, kvh = k_cache.shape[1], k_cache.shape[2]
    if h % kvh:
        raise ValueError(f"num_heads {h} is not a multiple of num_kv_heads {kvh}")
    group = h // kvh
    d_pad = triton.next_power_of_2(d)
    block_n = block_n or _dot_block(d_pad, q.dtype)
    if not max_seq_len:
        max_seq_len = block_tables.shape[1] * bs
    if num_splits is None:
        num_splits = choose_num_splits(b, kvh, max_seq_len, q.device)
    num_splits = max(1, int(num_splits))
    split = num_splits > 1
    if split:
        n = b * h * num_splits
        part = torch.empty(n * (d + 2), dtype=torch.float32, device=q.device)  # one allocation
        part_acc, part_m, part_l = part[:n * d], part[n * d:n * (d + 1)], part[n * (d + 1):]
    else:
        part_acc = part_m = part_l = out  # unused
    _decode_kernel[(b, kvh, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens,
        out, part_acc, part_m, part_l,
        scale * k_scale * _LOG2E, float(v_scale),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        num_splits,
        NUM_HEADS=h, GROUP=group, G_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=d, D_PAD=d_pad, BLOCK_SIZE=bs, BLOCK_N=block_n,
        SPLIT=split, DOT_FP32=_dot_fp32(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    if split:
        _decode_reduce_kernel[(b, h)](
            part_acc, part_m, part_l, out, out.stride(0), out.stride(1), num_splits,
            NUM_HEADS=h, HEAD_DIM=d, D_PAD=d_pad, S_PAD=max(64, triton.next_power_of_2(num_splits)),  # one variant
            num_warps=4,
        )
    return out


def paged_prefill_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                   block_tables: torch.Tensor, query_start: torch.Tensor,
                                   seq_lens: torch.Tensor, max_query_len: int, scale: float,
                                   block_m: int | None = None, block_n: int | None = None,
                                   out: torch.Tensor | None = None,
                                   num_warps: int = 4, num_stages: int = 2,
                                   k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """q [Tp, H, D] holding P chunks back to back -> out [Tp, H, D]; see `paged_prefill_attention_ref`.

    query_start [P+1] and seq_lens [P] are device tensors; max_query_len is a
    host int (it sizes the grid).
    """
    tp, h, d = q.shape
    if out is None:
        out = torch.empty_like(q)
    p = seq_lens.shape[0]
    if tp == 0 or p == 0 or max_query_len <= 0:
        return out
    _check_cache(k_cache, v_cache)
    q = _last_dim_contiguous(q)
    bs, kvh = k_cache.shape[1], k_cache.shape[2]
    if h % kvh:
        raise ValueError(f"num_heads {h} is not a multiple of num_kv_heads {kvh}")
    d_pad = triton.next_power_of_2(d)
    block_n = block_n or _dot_block(d_pad, q.dtype)
    block_m = block_m or _dot_block(d_pad, q.dtype)
    grid = (h, triton.cdiv(max_query_len, block_m), p)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start, seq_lens, out,
        scale * k_scale * _LOG2E, float(v_scale),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        GROUP=h // kvh, HEAD_DIM=d, D_PAD=d_pad, BLOCK_SIZE=bs, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_FP32=_dot_fp32(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


class TritonAttentionBackend:
    """Paged attention with Triton kernels (the CUDA default)."""

    name = "triton"

    def __init__(self, decode_num_splits: int | None = None, k_scale: float = 1.0, v_scale: float = 1.0):
        # None: pick per call from the batch size and the longest context.
        self.decode_num_splits = decode_num_splits
        # Per-tensor scales of an fp8 KV cache (1.0 uncalibrated, as vLLM); unused for a 16-bit cache.
        self.k_scale, self.v_scale = k_scale, v_scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q [T, H, D], k/v [T, KVH, D] for the flat batch -> [T, H, D]."""
        fp8 = k_cache.dtype == torch.float8_e4m3fn
        ks, vs = (self.k_scale, self.v_scale) if fp8 else (1.0, 1.0)
        write_kv_triton(k, v, k_cache, v_cache, meta.slot_mapping, ks, vs)
        out = torch.empty_like(q)
        nd = meta.num_decode
        if nd:
            paged_decode_attention_triton(q[:nd], k_cache, v_cache, meta.decode_block_tables,
                                          meta.decode_seq_lens, scale, meta.decode_max_seq_len,
                                          num_splits=self.decode_num_splits, out=out[:nd], k_scale=ks, v_scale=vs)
        if meta.num_prefill:
            qs = meta.prefill_query_start_list
            max_qlen = max(qs[i + 1] - qs[i] for i in range(len(qs) - 1))
            paged_prefill_attention_triton(q[nd:], k_cache, v_cache, meta.prefill_block_tables,
                                           meta.prefill_query_start, meta.prefill_seq_lens, max_qlen,
                                           scale, out=out[nd:], k_scale=ks, v_scale=vs)
        return out


# Decided when the kernels were decorated (TRITON_INTERPRET=1 at import time).
_INTERPRETED = type(_decode_kernel).__name__ == "InterpretedFunction"
