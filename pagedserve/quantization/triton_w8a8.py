"""W8A8 in Triton, one code path for fp8 (e4m3) and int8: per-token activation quant, then a GEMM on the
8-bit tensor cores with both scales and the bias applied in its epilogue.

* `per_token_quant(x, dtype)`: one program a row; pass 1 takes the row's absmax, pass 2 scales, clamps and
  casts (fp8: the hardware's round-to-nearest cast; int8: round half away from zero, then clamp to +-127).
  The second read hits L2 for a linear's input row (<= 64 KiB). Scales are fp32 [M, 1]. No host sync, so
  it can be captured in a CUDA graph.
* `w8a8_gemm`: y[m, n] = acc[m, n] * s_x[m] * s_w[n] (+ bias[n]) with acc = q_x[m, :] . q_w[n, :]
  accumulated in fp32 (fp8) or int32 (int8, exact for K < 133,000). The weight stays row-major [N, K]:
  both operands are K-major, the layout Hopper's fp8/int8 wgmma wants, so no transpose is ever made.
  Loads carry no masks on K (the wrapper requires K % BLOCK_K == 0; 8-bit loads cannot take an `other=`).
  Rows past M or N are wrapped onto valid ones (`% M`, `% N`) and dropped at the store, except the
  swapped kernel's activation columns, which are masked: wrapped, M=1 read one row 16 times a K step and
  the layer's GEMMs took 15% longer than at M=4.
  With few output tiles (decode-sized M, N = 3584 on a 132-SM GPU) K is split: fp32 partials of the
  scaled product go to [SPLIT, M, N], and the last split of a tile to finish (an arrival counter per
  tile) sums them in split order and writes y, in the same launch (triton_quant.store_tile). It replaced a
  separate reduce kernel; the sweep's GEMM sums stayed within noise (fp8 M=1: 90 vs 88 us,
  results/quant_tile_sweep_h200_splitk_epilogue.json), with one kernel and one launch fewer.

Replaces `torch._scaled_mm` (rowwise) and `torch._int_mm` + a separate int32 -> dtype epilogue pass: the
int32 accumulator of a [256, 37888] gate_up no longer makes a round trip through memory, and tile sizes
are ours to pick per M (`_gemm_config`: from benchmarks/quant_tile_sweep.py on an H200). Up to M=32 the
operands are swapped (y^T = W x^T): the dot's first side is 64 weight rows rather than 16 padded activation
rows, and the layer's four GEMMs took 9% less time for it. Summed over a 7B layer's four GEMMs (activation
quant included) the kernel runs at 1.62x (fp8) bf16 cuBLAS at M=16, 1.57x at M=32, 1.56x / 1.33x at
M=1024; a weight-only GEMV written for decode lost to it at every M and was dropped. Also dropped:
quantizing the activation inside the GEMM's launch for M <= 4 (each program taking its rows' absmax over
all of K) to save the separate quant kernel of o_proj and down_proj: at M=1, o 11.4 us against 8.5 and
down 39.3 against 23.9 (results/quant_tile_sweep_h200_quant_inside.json, "Q" candidates); the serial
absmax loop is latency-bound.
Under Triton's CPU interpreter the dot runs on fp32 copies of the 8-bit tiles (exact values).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from pagedserve.quantization.fp8_dtype import FP8, FP8_MAX
from pagedserve.quantization.triton_quant import TileConfig, _interpreted, _sms, bucket_ends, split_k_buffers, store_tile

INT8_MAX = 127.0


@triton.jit
def quant_scale(amax, QMAX: tl.constexpr):
    """A row's scale from its absmax (fp32): what every per-token quant here divides by."""
    return tl.maximum(amax / QMAX, 1e-12)


@triton.jit
def quantize(x, scale, q_ptr, QMAX: tl.constexpr, IS_INT: tl.constexpr):
    """fp32 values x / scale as q_ptr's element type. fp8: clamp, then the hardware's round-to-nearest cast;
    int8: round half away from zero, then clamp to +-127. The fused norm kernels call this too, so
    their quantized output is bit-identical to this module's per_token_quant of the same values."""
    v = x / scale
    if IS_INT:
        v = v + tl.where(v >= 0, 0.5, -0.5)  # then truncation toward zero: round half away from zero
        v = tl.minimum(tl.maximum(v, -QMAX), QMAX).to(tl.int32)
    else:
        v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
    return v.to(q_ptr.dtype.element_ty)


@triton.jit
def _per_token_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm,
                            QMAX: tl.constexpr, IS_INT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        k = k0 + offs
        x = tl.load(x_ptr + row * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = quant_scale(tl.max(amax, 0), QMAX)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        k = k0 + offs
        x = tl.load(x_ptr + row * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * stride_qm + k, quantize(x, scale, q_ptr, QMAX, IS_INT), mask=k < K)


def qmax(dtype: torch.dtype) -> float:
    """The largest magnitude a per-token quantized value of `dtype` (float8_e4m3fn or int8) takes."""
    if dtype == torch.int8:
        return INT8_MAX
    if dtype == FP8:
        return FP8_MAX
    raise ValueError(f"per-token quantization is to float8_e4m3fn or int8, not {dtype}")


def per_token_quant(x: torch.Tensor, dtype: torch.dtype = FP8) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K] of `dtype` (float8_e4m3fn or int8), scale fp32 [M, 1]), x[m] ~= q[m] * scale[m]."""
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty(m, k, dtype=dtype, device=x.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        block = min(4096, triton.next_power_of_2(k))
        _per_token_quant_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), QMAX=qmax(dtype),
                                      IS_INT=dtype == torch.int8, BLOCK=block, num_warps=4 if block <= 2048 else 8)
    return q, s


@triton.jit(do_not_specialize=["M", "SPLIT"])  # every batch size runs one compiled kernel per tile config
def _w8a8_kernel(a_ptr, w_ptr, sa_ptr, sw_ptr, b_ptr, y_ptr, p_ptr, lock_ptr, M, N, K, K_SPLIT, SPLIT,
                 stride_am, stride_wn, stride_ym,
                 HAS_BIAS: tl.constexpr, IS_INT: tl.constexpr, DOT_FP32: tl.constexpr, PARTIAL: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                 SWAP_AB: tl.constexpr):
    # SWAP_AB: y^T = W x^T, the weight tile as the dot's first operand. With decode-sized M the dot's first
    # side is then BLOCK_N weight rows (>= 64: Hopper's wgmma) instead of a 16-row activation tile.
    # Grouped tile order: GROUP_M row blocks walk the N tiles together, so a weight tile is reused from L2.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    am = (rm % M).to(tl.int64)  # wrapped rows: loads need no mask, the store drops them
    wn = (rn % N).to(tl.int64)
    k_lo = pid_k * K_SPLIT  # K_SPLIT and K are multiples of BLOCK_K
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    acc_type = tl.int32 if IS_INT and not DOT_FP32 else tl.float32
    if SWAP_AB:  # first operand W [BN, BK], second x^T [BK, BM]: both still K-major
        lhs_ptrs = w_ptr + wn[:, None] * stride_wn + (k_lo + rk)[None, :]
        rhs_ptrs = a_ptr + am[None, :] * stride_am + (k_lo + rk)[:, None]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=acc_type)
    else:
        lhs_ptrs = a_ptr + am[:, None] * stride_am + (k_lo + rk)[None, :]
        rhs_ptrs = w_ptr + wn[None, :] * stride_wn + (k_lo + rk)[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_type)
    for _ in range(k_lo, k_hi, BLOCK_K):
        lhs = tl.load(lhs_ptrs)
        if SWAP_AB:  # activation columns past M are not read (their garbage stays in dropped output rows)
            rhs = tl.load(rhs_ptrs, mask=(rm < M)[None, :])
        else:
            rhs = tl.load(rhs_ptrs)
        if DOT_FP32:
            acc += tl.dot(lhs.to(tl.float32), rhs.to(tl.float32), input_precision="ieee")
        elif IS_INT:
            acc = tl.dot(lhs, rhs, acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(lhs, rhs, acc)
        lhs_ptrs += BLOCK_K
        rhs_ptrs += BLOCK_K
    m_ok, n_ok = rm < M, rn < N
    sa = tl.load(sa_ptr + am).to(tl.float32)
    sw = tl.load(sw_ptr + wn).to(tl.float32)
    if SWAP_AB:
        out = tl.trans(acc.to(tl.float32)) * sa[:, None] * sw[None, :]
    else:
        out = acc.to(tl.float32) * sa[:, None] * sw[None, :]
    store_tile(out, y_ptr, p_ptr, lock_ptr, b_ptr, rm, rn, m_ok, n_ok, pid, pid_k, M, N, stride_ym, SPLIT,
               HAS_BIAS, PARTIAL)


# kind -> ((largest M, (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, swap_ab)), ...): the config with the least
# time summed over the 7B projections at each measured M (benchmarks/quant_tile_sweep.py, H200). Up to M=32
# the operands are swapped (y^T = W x^T; results/quant_tile_sweep_swap_h200_{fp8,int8}.json): summed over a
# layer, fp8 M=16 78 us against 86 for the unswapped 16-row tiles, M=32 83 against 90; bf16 cuBLAS 127-130.
# Above, results/quant_tile_sweep_h200.json; us, ours vs bf16: fp8 115/137 (128), 252/359 (512), 444/692
# (1024); int8 121/137, 306/359, 520/692.
# Up to M=16, from benchmarks/quant_cold_sweep.py (cold weights, as a decode step streams them; the hot
# single-weight sweep above flattered qkv and o, which fit in L2), us summed over a 7B layer's four GEMMs
# at M=1 / 4 / 16, vLLM's CUTLASS fp8 GEMM in the same run first (results/quant_cold_ab_h200_fp8.json):
# 71.7 / 73.1 / 73.2 against ours 70.7 / 71.2 / 72.3: 16x64x256 tiles with a 6-deep pipeline (73.2 /
# 73.9 / 74.7 with the 4-deep one before), and 16x256x128 8-warp tiles (`_WIDE`) where the 64-wide tiles
# would number >= 4 per SM (gate_up, N = 37888: 35.2 us against 40.6 at M=1). int8: 71.7 / 72.4 / 73.4,
# CUTLASS int8 81.7 / 81.5 / 82.2. Before the swapped kernel masked its activation loads past M (it read
# row 0 sixteen times at M=1), the old tiles took 84.4 us at M=1 against 73.6 at M=4
# (results/quant_cold_sweep_h200_wrapped_loads.json).
_SWAPPED = ((16, (16, 64, 256, 4, 6, True)), (32, (32, 64, 256, 4, 4, True)))
_WIDE = (16, 256, 128, 8, 3, True)
_TILES = {
    "fp8": (*_SWAPPED, (64, (64, 128, 128, 4, 4, False)), (128, (128, 64, 128, 4, 4, False)),
            (512, (128, 128, 128, 4, 4, False)), (1 << 62, (128, 256, 128, 8, 3, False))),
    "int8": (*_SWAPPED, (64, (64, 128, 128, 4, 4, False)), (128, (128, 64, 128, 4, 4, False)),
             (256, (128, 128, 256, 8, 3, False)), (512, (128, 128, 128, 4, 4, False)),
             (1024, (128, 256, 128, 8, 3, False)), (1 << 62, (256, 128, 128, 8, 3, False))),
}


def _gemm_config(m: int, n: int, k: int, sms: int, kind: str = "fp8", smem: int | None = None) -> TileConfig:
    """Tiles by M bucket (`_TILES`), the K step cut to a divisor of K, and K split when the output tiles
    alone leave SMs idle. Swapped tiles split only long K loops, to ~1 program per SM and >= 16 K steps
    each (the sweep: qkv, o and gate_up ran fastest unsplit, down with 2 splits); the others to ~1
    program per SM (the sweep: fewer, longer splits won; partials cost a write and a read each).
    `smem`: the GPU's shared memory per block (bytes); the pipeline loses stages until its 8-bit operand
    buffers fit (the table is tuned on Hopper's 227 KiB; Ada has 99)."""
    bm, bn, bk, warps, stages, swap = next(t for top, t in _TILES[kind] if m <= top)
    if m <= _WIDE[0] and triton.cdiv(n, bn) >= 4 * sms:
        bm, bn, bk, warps, stages, swap = _WIDE
    while k % bk:
        bk //= 2
    while smem is not None and stages > 2 and stages * (bm + bn) * bk > smem:
        stages -= 1
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    return TileConfig(bm, bn, bk, whole_splits(k_split(tiles, k // bk, sms, swap), k // bk), warps, stages, swap)


def k_split(tiles: int, k_tiles: int, sms: int, swap: bool) -> int:
    """`_gemm_config`'s K split for `tiles` output tiles of `k_tiles` K steps (the sweep applies it to every
    candidate): toward ~1 program per SM, each split >= 16 K steps when swapped, >= 4 otherwise, <= 16."""
    return max(1, min(round(sms / tiles), k_tiles // (16 if swap else 4), 16))


def whole_splits(split: int, k_tiles: int) -> int:
    """`split` (clamped to 1..k_tiles) rounded to the count that equal ranges of K tiles give: none is empty."""
    split = max(1, min(split, k_tiles))
    return triton.cdiv(k_tiles, triton.cdiv(k_tiles, split))


@functools.lru_cache(maxsize=8)
def _smem_at(index: int) -> int | None:
    return getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", None)


def _smem(device: torch.device) -> int | None:
    """Shared memory per block on a CUDA device (None elsewhere: the interpreter has no limit)."""
    if device.type != "cuda":
        return None
    return _smem_at(device.index if device.index is not None else torch.cuda.current_device())


def w8a8_supported(n: int, k: int) -> bool:
    """K must be a multiple of 16 (no K masks; the smallest K step); any N."""
    return k % 16 == 0


@functools.lru_cache(maxsize=8)
def int8_mma_available(index: int) -> bool:
    """Triton's int8 tl.dot is tested here from Ampere (8.0) on; older GPUs take the dequantized path."""
    return torch.cuda.get_device_capability(index) >= (8, 0)


def w8a8_gemm(q_x: torch.Tensor, s_x: torch.Tensor, q_w: torch.Tensor, s_w: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype, cfg: TileConfig | None = None) -> torch.Tensor:
    """q_x [M, K] (fp8/int8) with s_x [M, 1] fp32, q_w [N, K] of the same dtype with s_w [N] -> [M, N]."""
    m, k = q_x.shape
    n = q_w.shape[0]
    if not w8a8_supported(n, k):
        raise ValueError(f"w8a8_gemm needs K % 16 == 0, got K={k}")
    y = torch.empty(m, n, dtype=out_dtype, device=q_x.device)
    if m == 0:
        return y
    cfg = cfg or _gemm_config(m, n, k, _sms(q_x.device), "int8" if q_x.dtype == torch.int8 else "fp8",
                              _smem(q_x.device))
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    split, part, locks = split_k_buffers(y, tiles, cfg.split)
    k_split = triton.cdiv(k // cfg.block_k, split) * cfg.block_k
    dummy = bias if bias is not None else s_w
    _w8a8_kernel[(tiles, split)](
        q_x, q_w, s_x, s_w, dummy, y, part, locks, m, n, k, k_split, split, q_x.stride(0), q_w.stride(0),
        y.stride(0), HAS_BIAS=bias is not None, IS_INT=q_x.dtype == torch.int8, DOT_FP32=_interpreted(),
        PARTIAL=split > 1, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=8,
        SWAP_AB=cfg.swap_ab, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y



def w8a8_linear(x: torch.Tensor, q_w: torch.Tensor, s_w: torch.Tensor, bias: torch.Tensor | None = None,
                cfg: TileConfig | None = None) -> torch.Tensor:
    """x [..., K] (bf16/fp16/fp32) -> [..., N]: per-token quant to q_w's dtype, then the W8A8 GEMM."""
    n, k = q_w.shape
    lead = x.shape[:-1]
    q_x, s_x = per_token_quant(x.reshape(-1, k), q_w.dtype)
    return w8a8_gemm(q_x, s_x, q_w, s_w, bias, x.dtype, cfg).view(*lead, n)


def warm_up_sizes(kind: str, max_m: int) -> list[int]:
    """triton_quant.bucket_ends of `_TILES[kind]`'s M buckets."""
    return bucket_ends((top for top, _ in _TILES[kind]), max_m)
