"""AWQ int4 GEMM in Triton: y = x @ dequant(W)^T, dequantizing tiles in registers; and the split-K
plumbing (tile configs, the shared tile epilogue `store_tile` with its arrival counters) that
triton_w8a8.py shares.

(The int8/fp8 weight-only kernel that lived here lost to the W8A8 kernel at every batch size on an
H200, benchmarks/quant_tile_sweep.py, and is gone.)

* ``awq_linear_triton``: AWQ GEMM layout (see awq_format.py): qweight int32 [K, N/8], qzeros int32
  [K/G, N/8], scales [K/G, N]. A K tile never straddles a group (BLOCK_K divides G), so each tile
  loads one row of zeros and scales. The packed words are loaded once per tile ([BLOCK_K, BLOCK_N/8])
  and the 8 nibbles unpacked by broadcasting over a trailing axis of 8, then reshaped to [BLOCK_K, BLOCK_N].
  (Loading each word once per column it holds instead, which needs no reshape, ran ~10x slower on an
  H200: benchmarks/results/quant_tile_sweep_awq_h200.json.)
* ``awq_t_linear``: the same product over the K-strided layout (awq_format.to_kstrided), with the weight
  as the dot's first operand: see `_awq_t_kernel`.

Accuracy: the dot sees only exact values (q - z in -15..15 is exact in bf16/fp16) and the
scale multiplies the fp32 partial product of each K tile, so the
result equals the fp32 dequantized reference up to fp32 accumulation order and the final rounding to x's
dtype. (Rounding a dequantized (q - z) * s tile to bf16 before the dot costs ~2^-9 relative per weight,
which is what made the old kernel miss a 2e-2 tolerance on the GPU.)

Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), SPLIT_K). With few output tiles (decode-sized M, N=4096 on a
132-SM GPU) K is split: each split writes fp32 partials [SPLIT_K, M, N] and the last split of each tile
sums them (store_tile); deterministic, and capturable in CUDA graphs (no host syncs; buffers come
from torch.empty, counters re-arm themselves). Tile sizes come from a small static table keyed on M
(see ``_config``). Under Triton's CPU interpreter, bf16/fp16 ``tl.dot`` operands are multiplied as raw
bits (triton 3.9), so there the dot runs on fp32 copies.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def store_tile(acc, y_ptr, p_ptr, lock_ptr, b_ptr, rm, rn, m_ok, n_ok, tile, pid_k, M, N, stride_ym, SPLIT,
               HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr):
    """Write one output tile of an fp32 accumulator (both quantized GEMMs end here).

    Unsplit: + bias, cast, store y. Split K (PARTIAL): store this split's fp32 partial at [pid_k, M, N], then
    count arrivals on the tile's lock; the last split to arrive sums all partials in split order
    (deterministic whichever split is last), adds the bias, writes y and re-arms the lock to 0 for the
    next launch (CUDA-graph replays included). The barrier makes every thread's partial visible before
    the counter's release; the .cg loads read partials from L2. This replaced a separate reduce kernel:
    one launch fewer per split projection, ~2 us each inside a CUDA graph at decode."""
    mask = m_ok[:, None] & n_ok[None, :]
    y_ptrs = y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
    if PARTIAL:
        offs = rm[:, None].to(tl.int64) * N + rn[None, :]
        tl.store(p_ptr + pid_k * M * N + offs, acc, mask=mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:
            total = tl.zeros(acc.shape, dtype=tl.float32)
            for s in range(SPLIT):
                total += tl.load(p_ptr + s * M * N + offs, mask=mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(lock_ptr + tile, 0, sem="relaxed", scope="gpu")
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M", "SPLIT"])  # one compiled kernel per tile config serves every batch size
def _awq_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, b_ptr, y_ptr, p_ptr, lock_ptr, M, N, K, GROUP, K_SPLIT, SPLIT,
                stride_xm, stride_ym,
                HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, PARTIAL: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    WORDS: tl.constexpr = BLOCK_N // 8
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rc = pid_n * WORDS + tl.arange(0, WORDS)  # packed word columns of this tile
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    npk = N // 8  # int32 words per packed row (N % 8 == 0)
    c_ok = rc < npk
    # Column c*8 + j sits in nibble AWQ_REVERSE_ORDER[j] = (0, 4, 1, 5, 2, 6, 3, 7)[j].
    j = tl.arange(0, 8)
    shift = ((j // 2) + (j % 2) * 4) * 4
    k_lo = pid_k * K_SPLIT  # K % BLOCK_K == 0 and K_SPLIT % BLOCK_K == 0 (the wrapper checks)
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_ok[:, None], other=0.0)
        g = k0 // GROUP
        packed = tl.load(qw_ptr + k[:, None] * npk + rc[None, :], mask=c_ok[None, :], other=0)  # [BK, WORDS]
        q = tl.reshape((packed[:, :, None] >> shift[None, None, :]) & 0xF, (BLOCK_K, BLOCK_N))
        zp = tl.load(qz_ptr + g * npk + rc, mask=c_ok, other=0)  # [WORDS]
        z = tl.reshape((zp[:, None] >> shift[None, :]) & 0xF, (BLOCK_N,))
        s = tl.load(s_ptr + g * N + rn, mask=n_ok, other=0.0).to(tl.float32)
        wq = q - z[None, :]  # exact small integers
        if DOT_FP32:
            part = tl.dot(x.to(tl.float32), wq.to(tl.float32), input_precision="ieee")
        else:
            part = tl.dot(x, wq.to(x.dtype))
        acc += part * s[None, :]
    store_tile(acc, y_ptr, p_ptr, lock_ptr, b_ptr, rm, rn, m_ok, n_ok, pid_m * tl.num_programs(1) + pid_n, pid_k,
               M, N, stride_ym, SPLIT, HAS_BIAS, PARTIAL)


@triton.jit(do_not_specialize=["M", "SPLIT"])
def _awq_t_kernel(x_ptr, qw_ptr, z_ptr, s_ptr, b_ptr, y_ptr, p_ptr, lock_ptr, M, N, K, GROUP, K_SPLIT, SPLIT,
                  stride_xm, stride_ym, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, PARTIAL: tl.constexpr,
                  BLOCK_GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y^T = W x^T over the K-strided layout (awq_format.to_kstrided): the dequantized weight is the dot's
    first operand ([BLOCK_N, 16] per nibble, straight from a shift and a mask: no reshape), x^T the second.
    A K step is one 128-row block: its [BLOCK_N, 16] words are loaded once, nibble j is the slice of rows
    16 j .. 16 j + 15. BLOCK_GROUP: the group spans whole blocks (G % 128 == 0), so the scale multiplies
    the block's sum once; otherwise each 16-row slice is scaled by its own group's scale."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = rn < N
    m_ok = rm < M
    rw = tl.arange(0, 16)
    kw = K // 8  # words per weight row
    k_lo = pid_k * K_SPLIT  # multiples of 128 (the wrapper checks)
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, 128):
        packed = tl.load(qw_ptr + rn[:, None].to(tl.int64) * kw + (k0 // 8 + rw)[None, :],
                         mask=n_ok[:, None], other=0)  # [BN, 16]
        if BLOCK_GROUP:
            g = k0 // GROUP
            z = tl.load(z_ptr + g * N + rn, mask=n_ok, other=0).to(tl.int32)
            blk = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for j in tl.static_range(8):
            kj = k0 + 16 * j
            xt = tl.load(x_ptr + rm[None, :] * stride_xm + (kj + rw)[:, None], mask=m_ok[None, :], other=0.0)
            if not BLOCK_GROUP:
                g = kj // GROUP
                z = tl.load(z_ptr + g * N + rn, mask=n_ok, other=0).to(tl.int32)
            w = ((packed >> (4 * j)) & 0xF) - z[:, None]  # exact small integers
            if DOT_FP32:
                part = tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(w.to(xt.dtype), xt)
            if BLOCK_GROUP:
                blk += part
            else:
                acc += part * tl.load(s_ptr + g * N + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        if BLOCK_GROUP:
            acc += blk * tl.load(s_ptr + g * N + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    store_tile(tl.trans(acc), y_ptr, p_ptr, lock_ptr, b_ptr, rm, rn, m_ok, n_ok,
               pid_n * tl.num_programs(1) + pid_m, pid_k, M, N, stride_ym, SPLIT, HAS_BIAS, PARTIAL)


def awq_t_config(m: int, n: int, k: int, sms: int) -> TileConfig:
    """Tiles of the transposed kernel: BLOCK_M (the dot's N side) 16/32/64 by M, BLOCK_N 64 (the weight rows),
    K split until ~2 programs per SM when the tiles are few. block_k is the packing block (128)."""
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    bn = 64
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    k_blocks = k // 128
    split = 1 if tiles >= 2 * sms else max(1, min(triton.cdiv(2 * sms, tiles), k_blocks // 2, 16))
    per = triton.cdiv(k_blocks, split)
    return TileConfig(bm, bn, 128, triton.cdiv(k_blocks, per), 4, 3)


def awq_t_linear(x: torch.Tensor, qw: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None, cfg: TileConfig | None = None) -> torch.Tensor:
    """x [..., K] @ W^T over the K-strided layout (qw int32 [N, K/8], zeros uint8 [K/G, N], scales [K/G, N])."""
    n, k = qw.shape[0], qw.shape[1] * 8
    group = k // zeros.shape[0]
    if k % 128 or group % 16:
        raise ValueError(f"the K-strided AWQ kernel needs K % 128 == 0 and a group of 16s, got K={k}, G={group}")
    x2, lead = _prep(x, k)
    m = x2.shape[0]
    cfg = cfg or awq_t_config(m, n, k, _sms(x.device))
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    if m == 0:
        return y.view(*lead, n)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), cfg.split)
    locks = tile_locks(x2.device)
    split = cfg.split if grid[0] * grid[1] <= locks.numel() else 1
    part = y if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x2.device)
    k_split = triton.cdiv(k // 128, split) * 128
    _awq_t_kernel[grid[:2] + (split,)](
        x2, qw, zeros, scales, bias if bias is not None else scales, y, part, locks, m, n, k, group, k_split, split,
        x2.stride(0), y.stride(0), HAS_BIAS=bias is not None, DOT_FP32=x2.dtype == torch.float32 or _interpreted(),
        PARTIAL=split > 1, BLOCK_GROUP=group % 128 == 0, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y.view(*lead, n)


_LOCKS = 4096


@functools.lru_cache(maxsize=16)
def _tile_locks_at(device: torch.device) -> torch.Tensor:
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # Made inside a capture, the zero fill would run only when the graph replays.
        raise RuntimeError("split-K counters must be made before CUDA-graph capture "
                           "(pagedserve.model.quant_warmup.warm_up does it at start-up)")
    return torch.zeros(_LOCKS, dtype=torch.int32, device=device)


def tile_locks(device: torch.device) -> torch.Tensor:
    """One int32 arrival counter per output tile of a split-K launch (store_tile), shared by every launch on
    the device: launches on one stream run one after another and each leaves its counters at 0. Made on
    first use, which the start-up warm-up reaches before any CUDA graph is captured."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _tile_locks_at(device)


def _interpreted() -> bool:
    return type(_awq_kernel).__name__ == "InterpretedFunction"


@dataclass(frozen=True)
class TileConfig:
    """One launch's tiling: output tile BLOCK_M x BLOCK_N, K step BLOCK_K, K split into `split` ranges."""
    block_m: int
    block_n: int
    block_k: int
    split: int
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # interpreter: a small pretend GPU so tiny test shapes still take the split-K path
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _config(m: int, n: int, k: int, sms: int, max_k: int, split_k: int | None = None) -> TileConfig:
    """Static tiling by M bucket.

    M <= 16 (decode): memory-bound; BLOCK_M=16 (the smallest tl.dot tile), 128 x 64 K steps, and K split
    until there are ~4 programs per SM. 16 < M <= 64: BLOCK_M 32/64, still split when tiles are few.
    M > 64: compute-bound-ish; 64/128 x 128 x 64 tiles, 4-8 warps, 3 stages; split (<= 4) only when the
    tiles are fewer than the SMs. BLOCK_K must divide the AWQ group, so `max_k` caps it."""
    if m <= _AWQ_BUCKETS[0]:
        bm, bn, bk, warps, stages = 16, 64, 128, 4, 4
    elif m <= _AWQ_BUCKETS[2]:
        bm, bn, bk, warps, stages = (32 if m <= _AWQ_BUCKETS[1] else 64), 64, 64, 4, 3
    else:
        bm, bn, bk, warps, stages = (64 if m <= _AWQ_BUCKETS[3] else 128), 128, 64, (4 if m <= 128 else 8), 3
    bk = min(bk, max_k)
    k_tiles = triton.cdiv(k, bk)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    if split_k is None:
        split = 1
        if m <= 64 and tiles < 2 * sms:  # memory-bound: ~4 programs per SM, >= 4 K tiles each
            split = max(1, min(4 * sms // tiles, k_tiles // 4, 16))
        elif m > 64 and tiles < sms:  # under one wave of big tiles (e.g. N=4096): fill the GPU, few partials
            split = max(1, min(triton.cdiv(2 * sms, tiles), k_tiles // 8, 4))
    else:
        split = max(1, min(split_k, k_tiles))
    per = triton.cdiv(k_tiles, split)  # K tiles per split; no split is left empty
    split = triton.cdiv(k_tiles, per)
    return TileConfig(bm, bn, bk, split, warps, stages)


_AWQ_BUCKETS = (16, 32, 64, 128)  # the largest M of each tiling of `_config` below the last


def awq_warm_up_sizes(max_m: int) -> list[int]:
    """Both ends of every M bucket of `_config` up to `max_m` (see triton_w8a8.warm_up_sizes)."""
    sizes, lo = [], 1
    for top in (*_AWQ_BUCKETS, 1 << 62):
        if lo > max_m:
            break
        sizes += sorted({lo, min(top, max_m)})
        lo = top + 1
    return sizes


def _prep(x: torch.Tensor, k: int) -> tuple[torch.Tensor, tuple]:
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2, lead


def awq_linear_triton(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                      bias: torch.Tensor | None = None, split_k: int | None = None,
                      cfg: TileConfig | None = None) -> torch.Tensor:
    """x [..., K] @ dequant(qweight, qzeros, scales)^T + bias -> [..., N] in x's dtype. `cfg` overrides the
    tiling (benchmarks/quant_tile_sweep.py)."""
    k, n = qweight.shape[0], qweight.shape[1] * 8
    group = k // qzeros.shape[0]
    if group % 16 or (group > 64 and group % 64):
        raise ValueError(f"AWQ group size {group} must be a multiple of 16 (and of 64 when above 64)")
    x2, lead = _prep(x, k)
    qweight, qzeros, scales = qweight.contiguous(), qzeros.contiguous(), scales.contiguous()
    m = x2.shape[0]
    cfg = cfg or _config(m, n, k, _sms(x.device), max_k=_largest_pow2_divisor(group, 128), split_k=split_k)
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    if m == 0:
        return y.view(*lead, n)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), cfg.split)
    locks = tile_locks(x2.device)
    split = cfg.split if grid[0] * grid[1] <= locks.numel() else 1
    part = y if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x2.device)
    k_split = triton.cdiv(triton.cdiv(k, cfg.block_k), split) * cfg.block_k
    _awq_kernel[grid[:2] + (split,)](
        x2, qweight, qzeros, scales, bias if bias is not None else scales, y, part, locks, m, n, k, group,
        k_split, split, x2.stride(0), y.stride(0), HAS_BIAS=bias is not None,
        DOT_FP32=x2.dtype == torch.float32 or _interpreted(), PARTIAL=split > 1,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return y.view(*lead, n)


def _largest_pow2_divisor(g: int, cap: int) -> int:
    """The largest power of two <= cap dividing g (BLOCK_K must be a power of two and divide the group)."""
    b = cap
    while g % b:
        b //= 2
    return b


# -- AWQ dense path: dequantize the whole weight once per call, then cuBLAS (large M) ----------------------
@triton.jit
def _awq_dequant_kernel(qw_ptr, qz_ptr, s_ptr, w_ptr, N, K, GROUP,
                        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """W^T [K, N] in the output's dtype: (q - z) * s, one [BLOCK_K, BLOCK_N] tile per program."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    WORDS: tl.constexpr = BLOCK_N // 8
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rc = pid_n * WORDS + tl.arange(0, WORDS)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    npk = N // 8
    k_ok = k < K
    c_ok = rc < npk
    j = tl.arange(0, 8)
    shift = ((j // 2) + (j % 2) * 4) * 4
    packed = tl.load(qw_ptr + k[:, None] * npk + rc[None, :], mask=k_ok[:, None] & c_ok[None, :], other=0)
    q = tl.reshape((packed[:, :, None] >> shift[None, None, :]) & 0xF, (BLOCK_K, BLOCK_N))
    g = k // GROUP
    zp = tl.load(qz_ptr + g[:, None] * npk + rc[None, :], mask=k_ok[:, None] & c_ok[None, :], other=0)
    z = tl.reshape((zp[:, :, None] >> shift[None, None, :]) & 0xF, (BLOCK_K, BLOCK_N))
    mask = k_ok[:, None] & (rn < N)[None, :]
    s = tl.load(s_ptr + g[:, None] * N + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    w = (q - z).to(tl.float32) * s
    tl.store(w_ptr + k[:, None] * N + rn[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


def awq_dequantize_triton(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                          dtype: torch.dtype) -> torch.Tensor:
    """The dense W^T [K, N] (x @ W^T layout) of an AWQ weight, rounded once to `dtype`."""
    k, n = qweight.shape[0], qweight.shape[1] * 8
    group = k // qzeros.shape[0]
    w = torch.empty(k, n, dtype=dtype, device=qweight.device)
    bk, bn = 32, 128
    _awq_dequant_kernel[(triton.cdiv(k, bk), triton.cdiv(n, bn))](
        qweight.contiguous(), qzeros.contiguous(), scales.contiguous(), w, n, k, group,
        BLOCK_K=bk, BLOCK_N=bn, num_warps=4)
    return w


def awq_linear_dense(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """Large-M AWQ: dequantize to x's dtype (one Triton pass), then cuBLAS (vLLM does the same from 256 tokens)."""
    y = torch.matmul(x, awq_dequantize_triton(qweight, qzeros, scales, x.dtype))
    return y if bias is None else y + bias
