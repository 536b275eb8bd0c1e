"""AWQ int4 GEMM in Triton over a K-strided layout, and the split-K plumbing (tile configs, the shared tile
epilogue `store_tile` with its arrival counters) that triton_w8a8.py shares.

* Layout (awq_format.to_kstrided, made once when the model reaches the GPU): qw int32 [N, K/8] where, in
  each block of 128 K rows, word w of row n holds in nibble j the value of K row 16 j + w; zeros uint8
  [K/G, N]; scales [K/G, N] as in the checkpoint. Shifting nibble j out of a block's 16 words gives the
  [BLOCK_N, 16] slice of K rows 16 j .. 16 j + 15 directly.
* ``awq_linear``: y^T = W x^T, the dequantized weight as the dot's first operand, one 16-row slice at a
  time; with groups of whole blocks (G % 128 == 0) the scale multiplies each block's fp32 sum once.
  Measured on an H200 (benchmarks/quant_tile_sweep.py --kinds awq), us summed over a 7B layer's four
  GEMMs, bf16 cuBLAS first: with the current 128-wide tiles (results/quant_tile_sweep_awq_wide_h200.json)
  M=1 124 vs 122, M=16 124 vs 131, M=64 126 vs 227; with the 64-wide tiles before them
  (results/quant_tile_sweep_awq_h200.json) M=1 128 vs 130, M=16 128 vs 136, M=32 131 vs 154, M=64 132 vs
  238. The checkpoint-layout kernel it replaced (unpack the N-packed words, then a reshape of the register
  tile) took 191 / 192 / 217 / 238; loading each word once per column it holds (no reshape) took ~10x
  longer still.
* ``awq_linear_dense`` (from dispatch.py's DENSE_FROM_M on): dequantize the whole weight to the compute
  dtype in one Triton pass, then cuBLAS.

Accuracy: the dot sees only exact values (q - z in -15..15 is exact in bf16/fp16) and the scale multiplies
fp32 partial sums, so the result equals the fp32 dequantized reference up to fp32 accumulation order and the
final rounding to x's dtype.

Grid (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M), SPLIT). With few output tiles (decode-sized M, N = 3584 on a
132-SM GPU) K is split: each split writes fp32 partials [SPLIT, M, N] and the last split of each tile sums
them (store_tile); deterministic, and capturable in CUDA graphs (no host syncs; buffers come from
torch.empty, counters re-arm themselves). Under Triton's CPU interpreter, bf16/fp16 ``tl.dot`` operands
are multiplied as raw bits (triton 3.9), so there the dot runs on fp32 copies.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedserve.quantization.awq_format import KBLOCK


@triton.jit
def store_tile(acc, y_ptr, p_ptr, lock_ptr, b_ptr, rm, rn, m_ok, n_ok, tile, pid_k, M, N, stride_ym, SPLIT,
               HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr):
    """Write one output tile of an fp32 accumulator (both quantized GEMMs end here).

    Unsplit: + bias, cast, store y. Split K (PARTIAL): store this split's fp32 partial at [pid_k, M, N], then
    count arrivals on the tile's lock; the last split to arrive sums all partials in split order
    (deterministic whichever split is last), adds the bias, writes y and re-arms the lock to 0 for the
    next launch (CUDA-graph replays included). The barrier makes every thread's partial visible before
    the counter's release; the .cg loads read partials from L2. It replaced a separate reduce kernel
    (one launch fewer per split projection; the W8A8 GEMM sums of the sweep moved within noise)."""
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
def _awq_kernel(x_ptr, qw_ptr, z_ptr, s_ptr, b_ptr, y_ptr, p_ptr, lock_ptr, M, N, K, GROUP, K_SPLIT, SPLIT,
                stride_xm, stride_ym, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, PARTIAL: tl.constexpr,
                SLICES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y^T = W x^T over the K-strided layout. A K step is one 128-row block: its [BLOCK_N, 16] words are
    loaded once and nibble j is the weight slice of rows 16 j .. 16 j + 15 (a shift and a mask: no
    reshape). SLICES: 16-row slices per scale (gcd(G, 128) / 16: 8 for G = 128): their dots accumulate
    in place into one fp32 sum, which the group's scale then multiplies once. (This one path replaced a
    per-block sum for G % 128 == 0 and a scale per slice otherwise; same speed, M = 1..64:
    results/awq_kernel_chain_ab_h200.json.)
    Tried and dropped: the block's 8 slices unpacked side by side into one [BLOCK_N, 128] tile (x^T loaded
    in the matching row order) for one dot of depth 128: 2x slower at M = 1, 16 and 64 (the register
    reshape costs more than the 8 short dots; results/quant_tile_sweep_awq_wide_h200.json)."""
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
        for j in tl.static_range(8):
            kj = k0 + 16 * j
            if j % SLICES == 0:  # a new group: its zeros, and a fresh sum for its scale
                g = kj // GROUP
                z = tl.load(z_ptr + g * N + rn, mask=n_ok, other=0).to(tl.int32)
                grp = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            xt = tl.load(x_ptr + rm[None, :] * stride_xm + (kj + rw)[:, None], mask=m_ok[None, :], other=0.0)
            w = ((packed >> (4 * j)) & 0xF) - z[:, None]  # exact small integers
            if DOT_FP32:
                grp = tl.dot(w.to(tl.float32), xt.to(tl.float32), grp, input_precision="ieee")
            else:
                grp = tl.dot(w.to(xt.dtype), xt, grp)  # accumulate in place: the group's dots chain
            if j % SLICES == SLICES - 1:
                acc += grp * tl.load(s_ptr + g * N + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    store_tile(tl.trans(acc), y_ptr, p_ptr, lock_ptr, b_ptr, rm, rn, m_ok, n_ok,
               pid_n * tl.num_programs(1) + pid_m, pid_k, M, N, stride_ym, SPLIT, HAS_BIAS, PARTIAL)


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
    swap_ab: bool = False  # W8A8 only: y^T = W x^T (triton_w8a8._w8a8_kernel's SWAP_AB)


@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # interpreter: a small pretend GPU so tiny test shapes still take the split-K path
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


_AWQ_BUCKETS = (16, 32)  # BLOCK_M 16 up to the first, 32 up to the second, 64 above


def awq_config(m: int, n: int, k: int, sms: int) -> TileConfig:
    """Tiles of `_awq_kernel`: BLOCK_M (the dot's second side) 16/32/64 by M, BLOCK_N 128 weight rows, 3 stages.
    The kernel is bound by the latency of its short dots, so K is split for more programs in flight: with
    16-row tiles to ~8 per SM (none once the tiles alone reach that); with 32- and 64-row tiles to ~2 per
    SM, and never fewer than 4 / 2 splits.
    16 rows, results/quant_tile_sweep_awq_wide_h200.json ("x16"): at M=1 gate_up took 59 us with 4 splits
    against 76 unsplit, the layer's four GEMMs 122 us (bf16 cuBLAS 124). 32 / 64 rows,
    results/quant_tile_sweep_awq_h200_stop19.json: the old targets (~4 / ~2 per SM, no floor) split qkv and
    o 14 ways at M=32 where 7-10 was best, and left gate_up (296 tiles) at 2 / 1 splits where 4 / 2 took
    74 / 124 us against 79 / 158; the best split per projection summed to 148 / 226 us over the layer
    against the old rule's 167 / 256 (bf16 127): AWQ stays slower than bf16 from M=32 on."""
    bm = 16 if m <= _AWQ_BUCKETS[0] else 32 if m <= _AWQ_BUCKETS[1] else 64
    bn = 128
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    k_blocks = k // KBLOCK
    if bm == 16:
        split = 1 if tiles >= 8 * sms else max(1, min(round(8 * sms / tiles), k_blocks // 2, 16))
    else:
        floor = 4 if bm == 32 else 2
        split = max(1, min(max(round(2 * sms / tiles), floor), k_blocks // 2, 16))
    per = triton.cdiv(k_blocks, split)  # K blocks per split; no split is left empty
    return TileConfig(bm, bn, KBLOCK, triton.cdiv(k_blocks, per), 8 if bm == 64 else 4, 3)


def bucket_ends(tops, max_m: int) -> list[int]:
    """Both ends of every M bucket (given by their largest M, ascending) up to `max_m`: the sizes the start-up
    warm-up runs. Within a bucket the K split only grows as M shrinks, so the two ends reach both the split
    and the unsplit variant of the bucket's tile config."""
    sizes, lo = [], 1
    for top in tops:
        if lo > max_m:
            break
        sizes += sorted({lo, min(top, max_m)})
        lo = top + 1
    return sizes


def awq_warm_up_sizes(max_m: int) -> list[int]:
    """bucket_ends of `awq_config`'s M buckets."""
    return bucket_ends((*_AWQ_BUCKETS, 1 << 62), max_m)


def _prep(x: torch.Tensor, k: int) -> tuple[torch.Tensor, tuple]:
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2, lead


def _check_layout(qw: torch.Tensor, zeros: torch.Tensor) -> tuple[int, int, int]:
    n, k = qw.shape[0], qw.shape[1] * 8
    group = k // zeros.shape[0]
    if k % KBLOCK or group % 16 or zeros.dtype != torch.uint8:
        raise ValueError(f"the AWQ kernels take the K-strided layout (awq_format.to_kstrided): K % 128 == 0, "
                         f"a group of 16s and uint8 zeros; got K={k}, G={group}, zeros {zeros.dtype}")
    return n, k, group


def awq_linear(x: torch.Tensor, qw: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
               bias: torch.Tensor | None = None, cfg: TileConfig | None = None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) over the K-strided layout (qw int32 [N, K/8], zeros uint8 [K/G, N], scales
    [K/G, N]) -> [..., N] in x's dtype. `cfg` overrides the tiling (benchmarks/quant_tile_sweep.py)."""
    n, k, group = _check_layout(qw, zeros)
    x2, lead = _prep(x, k)
    m = x2.shape[0]
    cfg = cfg or awq_config(m, n, k, _sms(x.device))
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    if m == 0:
        return y.view(*lead, n)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m))
    split, part, locks = split_k_buffers(y, grid[0] * grid[1], cfg.split)
    k_split = triton.cdiv(k // KBLOCK, split) * KBLOCK
    _awq_kernel[grid + (split,)](
        x2, qw, zeros, scales, bias if bias is not None else scales, y, part, locks, m, n, k, group, k_split, split,
        x2.stride(0), y.stride(0), HAS_BIAS=bias is not None, DOT_FP32=x2.dtype == torch.float32 or _interpreted(),
        PARTIAL=split > 1, SLICES=math.gcd(group, KBLOCK) // 16, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y.view(*lead, n)


# -- split-K arrival counters ---------------------------------------------------------------------------
_LOCKS = 4096


@functools.lru_cache(maxsize=16)
def _tile_locks_at(device: torch.device) -> torch.Tensor:
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # Made inside a capture, the zero fill would run only when the graph replays.
        raise RuntimeError("split-K counters must be made before CUDA-graph capture "
                           "(pagedserve.quantization.warmup.warm_up does it at start-up)")
    return torch.zeros(_LOCKS, dtype=torch.int32, device=device)


def split_k_buffers(y: torch.Tensor, tiles: int, split: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(split, fp32 partials [split, M, N] (y itself when unsplit), arrival counters) for a launch writing y
    [M, N] in `tiles` output tiles; no split when the tiles outnumber the counters (a caller's own config)."""
    locks = tile_locks(y.device)
    if tiles > locks.numel():
        split = 1
    part = y if split == 1 else torch.empty(split, *y.shape, dtype=torch.float32, device=y.device)
    return split, part, locks


def tile_locks(device: torch.device) -> torch.Tensor:
    """One int32 arrival counter per output tile of a split-K launch (store_tile), shared by every launch on
    the device: launches on one stream run one after another and each leaves its counters at 0. Made on
    first use, which the start-up warm-up reaches before any CUDA graph is captured."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _tile_locks_at(device)


# -- AWQ dense path: dequantize the whole weight once per call, then cuBLAS (large M) ----------------------
@triton.jit
def _awq_dequant_kernel(qw_ptr, z_ptr, s_ptr, w_ptr, N, K, GROUP, BLOCK_N: tl.constexpr):
    """W [N, K] in the output's dtype, (q - z) * s: one program per (BLOCK_N rows, 128-row K block)."""
    pid_n = tl.program_id(0)
    k0 = tl.program_id(1) * 128
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rw = tl.arange(0, 16)
    n_ok = rn < N
    packed = tl.load(qw_ptr + rn[:, None].to(tl.int64) * (K // 8) + (k0 // 8 + rw)[None, :], mask=n_ok[:, None],
                     other=0)
    for j in tl.static_range(8):
        kj = k0 + 16 * j
        g = kj // GROUP
        z = tl.load(z_ptr + g * N + rn, mask=n_ok, other=0).to(tl.int32)
        s = tl.load(s_ptr + g * N + rn, mask=n_ok, other=0.0).to(tl.float32)
        w = (((packed >> (4 * j)) & 0xF) - z[:, None]).to(tl.float32) * s[:, None]
        tl.store(w_ptr + rn[:, None].to(tl.int64) * K + (kj + rw)[None, :], w.to(w_ptr.dtype.element_ty),
                 mask=n_ok[:, None])


def awq_dequantize(qw: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [N, K] (nn.Linear layout) of a K-strided AWQ weight, rounded once to `dtype`."""
    n, k, group = _check_layout(qw, zeros)
    w = torch.empty(n, k, dtype=dtype, device=qw.device)
    bn = 64
    _awq_dequant_kernel[(triton.cdiv(n, bn), k // KBLOCK)](qw, zeros, scales, w, n, k, group, BLOCK_N=bn,
                                                           num_warps=4)
    return w


def awq_linear_dense(x: torch.Tensor, qw: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """Large-M AWQ: dequantize to x's dtype (one Triton pass), then cuBLAS (vLLM does the same from 256 tokens)."""
    return torch.nn.functional.linear(x, awq_dequantize(qw, zeros, scales, x.dtype), bias)
