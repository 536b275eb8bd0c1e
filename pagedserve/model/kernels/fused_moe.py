"""Fused mixture-of-experts in Triton: every expert's two GEMMs for a whole batch in two launches.

The T tokens each pick top-k experts, which gives S = T * k token slots (slot s = token s // k, its
(s % k)-th choice). The steps, all on the GPU with no host sync, so a decode step can be captured in
a CUDA graph (every size below depends on T only):

0. route (`route`): one program per token, softmax over its router logits, top-k by repeated argmax,
   renormalization; the same arithmetic as layers.moe.route in one launch.
1. align (`align_slots`, torch ops): the slots sorted by expert, each expert's segment padded up to a
   multiple of BLOCK_M with the sentinel S, and for every BLOCK_M block the expert it belongs to
   (E for blocks past the last segment: their programs return at once). The grid is sized for the
   worst case, S + min(S, E) * (BLOCK_M - 1) rows.
2. `_moe_gate_up_kernel`: for each block, its tokens' rows of x times the block expert's gate and up rows
   of w13 [E, 2I, H], both accumulated in one program, then SiLU(gate) * up in the epilogue: the
   [S, 2I] intermediate of an unfused gate_up GEMM is never written. Output h [S, I], row = slot.
3. `_moe_down_kernel`: h's rows of each block times the expert's w2 [E, H, I], multiplied by the slot's
   routing weight in the epilogue, into fp32 y [S, H].
4. y.view(T, k, H).sum(1): the sum over the top-k choices, in fp32, then cast.

Each output row depends on its own token's x row and routing only: a NaN in one token stays in it.
Loads carry no masks: K steps divide K, weight rows past N wrap (% N) and padded slots read token 0;
the stores drop them. fp8 weights (e4m3, one fp32 scale per output row) are converted to the
activation's dtype tile by tile (exact) and the scale applied to the accumulator.

Tiles come from `moe_config`: `_TILES` keyed by (E, I, weight kind) and the token count's bucket, filled from
benchmarks/moe_tile_sweep.py on the GPU; shapes not in it take `_DEFAULT`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["S"])  # one compiled kernel per tile config for every batch size
def _moe_gate_up_kernel(x_ptr, w_ptr, s_ptr, h_ptr, slot_ptr, expert_ptr, S, TOPK, E, N, K,
                    stride_xm, stride_we, stride_wn, stride_se, stride_hm,
                    HAS_SCALE: tl.constexpr, DOT_FP32: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    num_blocks = tl.num_programs(0) // tl.cdiv(N, BLOCK_N)
    pid_m = pid % num_blocks  # consecutive programs share a weight tile (L2) across one expert's blocks
    pid_n = pid // num_blocks
    expert = tl.load(expert_ptr + pid_m).to(tl.int64)
    if expert >= E:
        return
    slots = tl.load(slot_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    slot_ok = slots < S
    tok = tl.where(slot_ok, slots // TOPK, 0).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    wn = (rn % N).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * stride_xm + rk[None, :]
    g_ptrs = w_ptr + expert * stride_we + wn[None, :] * stride_wn + rk[:, None]
    u_ptrs = g_ptrs + N * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):
        x = tl.load(x_ptrs)
        g = tl.load(g_ptrs)
        u = tl.load(u_ptrs)
        if DOT_FP32:
            x = x.to(tl.float32)
            acc_g = tl.dot(x, g.to(tl.float32), acc_g, input_precision="ieee")
            acc_u = tl.dot(x, u.to(tl.float32), acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(x, g.to(x.dtype), acc_g)
            acc_u = tl.dot(x, u.to(x.dtype), acc_u)
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    if HAS_SCALE:
        acc_g *= tl.load(s_ptr + expert * stride_se + wn)[None, :]
        acc_u *= tl.load(s_ptr + expert * stride_se + N + wn)[None, :]
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    mask = slot_ok[:, None] & (rn < N)[None, :]
    tl.store(h_ptr + slots[:, None].to(tl.int64) * stride_hm + rn[None, :],
             h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["S"])
def _moe_down_kernel(h_ptr, w_ptr, s_ptr, rw_ptr, y_ptr, slot_ptr, expert_ptr, S, E, N, K,
                 stride_hm, stride_we, stride_wn, stride_se, stride_ym,
                 HAS_SCALE: tl.constexpr, DOT_FP32: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    num_blocks = tl.num_programs(0) // tl.cdiv(N, BLOCK_N)
    pid_m = pid % num_blocks
    pid_n = pid // num_blocks
    expert = tl.load(expert_ptr + pid_m).to(tl.int64)
    if expert >= E:
        return
    slots = tl.load(slot_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    slot_ok = slots < S
    row = tl.where(slot_ok, slots, 0).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    wn = (rn % N).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + row[:, None] * stride_hm + rk[None, :]
    w_ptrs = w_ptr + expert * stride_we + wn[None, :] * stride_wn + rk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs)
        w = tl.load(w_ptrs)
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w.to(a.dtype), acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_SCALE:
        acc *= tl.load(s_ptr + expert * stride_se + wn)[None, :]
    acc *= tl.load(rw_ptr + row)[:, None]
    mask = slot_ok[:, None] & (rn < N)[None, :]
    tl.store(y_ptr + row[:, None] * stride_ym + rn[None, :], acc, mask=mask)


@triton.jit(do_not_specialize=["S"])
def _moe_align_kernel(ids_ptr, slots_ptr, experts_ptr, S, E, ROWS, BLOCKS,
                      E_P: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
    """One program: count the slots per expert, pad the segments, write each block's expert, then place
    every slot at its expert's segment start + its rank among the expert's earlier slots (slot order)."""
    ex = tl.arange(0, E_P)
    offs = tl.arange(0, CHUNK)
    counts = tl.zeros((E_P,), dtype=tl.int32)
    for c0 in range(0, S, CHUNK):
        ids = tl.load(ids_ptr + c0 + offs, mask=c0 + offs < S, other=E_P)
        counts += tl.sum((ids[:, None] == ex[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    for b0 in range(0, BLOCKS, CHUNK):
        b = b0 + offs
        owner = tl.sum(((ends[None, :] <= (b * BLOCK_M)[:, None]) & (ex < E)[None, :]).to(tl.int32), axis=1)
        tl.store(experts_ptr + b, owner, mask=b < BLOCKS)
    for r0 in range(0, ROWS, CHUNK):
        tl.store(slots_ptr + r0 + offs, tl.full((CHUNK,), 0, tl.int32) + S, mask=r0 + offs < ROWS)
    tl.debug_barrier()  # the sentinels are down before any slot lands on them
    seen = tl.zeros((E_P,), dtype=tl.int32)
    for c0 in range(0, S, CHUNK):
        ok = c0 + offs < S
        ids = tl.load(ids_ptr + c0 + offs, mask=ok, other=E_P)
        hot = (ids[:, None] == ex[None, :]).to(tl.int32)
        rank = tl.sum(tl.cumsum(hot, axis=0) * hot, axis=1) - 1  # among this chunk's slots of the expert
        base = tl.sum(hot * (starts + seen)[None, :], axis=1)
        tl.store(slots_ptr + base + rank, (c0 + offs).to(tl.int32), mask=ok)
        seen += tl.sum(hot, axis=0)


@triton.jit
def _moe_route_kernel(logits_ptr, w_ptr, ids_ptr, E, stride_lm, TOPK: tl.constexpr, E_P: tl.constexpr,
                      RENORM: tl.constexpr):
    """One token: softmax over its E logits in fp32, top-k by repeated argmax, optionally renormalized.
    The ids are clamped into [0, E): a row of NaN logits still names real experts (its own output is
    NaN; no other row reads anything of it)."""
    row = tl.program_id(0).to(tl.int64)
    ex = tl.arange(0, E_P)
    x = tl.load(logits_ptr + row * stride_lm + ex, mask=ex < E, other=-float("inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, axis=0))
    p = p / tl.sum(p, axis=0)
    p = tl.where(p == p, p, -2.0)  # NaN (an overflowed or NaN row) is never picked over a number
    offs = tl.arange(0, TOPK)
    w = tl.zeros((TOPK,), dtype=tl.float32)
    ids = tl.zeros((TOPK,), dtype=tl.int32)
    for j in tl.static_range(TOPK):
        best = tl.max(p, axis=0)
        idx = tl.minimum(tl.argmax(p, axis=0), E - 1)
        w = tl.where(offs == j, tl.where(best < -1.0, float("nan"), best), w)  # a NaN row: NaN weights
        ids = tl.where(offs == j, idx, ids)
        p = tl.where(ex == idx, -3.0, p)
    if RENORM:
        w = w / tl.sum(w, axis=0)
    tl.store(w_ptr + row * TOPK + offs, w)
    tl.store(ids_ptr + row * TOPK + offs, ids)


def _interpreted() -> bool:
    return type(_moe_gate_up_kernel).__name__ == "InterpretedFunction"


@dataclass(frozen=True)
class GemmTiles:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class MoeTiles:
    """One MoE call's tiling: BLOCK_M (shared by both GEMMs: the align pads to it) and each GEMM's own."""
    block_m: int
    gate_up: GemmTiles
    down: GemmTiles


def _tiles(bm: int, g: tuple[int, int, int, int], d: tuple[int, int, int, int]) -> MoeTiles:
    return MoeTiles(bm, GemmTiles(*g), GemmTiles(*d))


# (largest token count T, tiles) per bucket, ascending. Defaults for shapes the sweep has not measured:
# 16-row blocks while the average expert gets a handful of slots, wider ones as T grows.
_DEFAULT: tuple[tuple[int, MoeTiles], ...] = (
    (32, _tiles(16, (64, 128, 4, 3), (64, 128, 4, 3))),
    (256, _tiles(32, (64, 128, 4, 3), (64, 128, 4, 3))),
    (1024, _tiles(64, (64, 64, 4, 3), (128, 64, 4, 3))),
    (1 << 62, _tiles(64, (128, 64, 8, 3), (128, 64, 8, 3))),
)
# (E, I, "bf16" or "fp8" weights) -> buckets as in _DEFAULT; benchmarks/moe_tile_sweep.py prints entries.
_TILES: dict[tuple[int, int, str], tuple[tuple[int, MoeTiles], ...]] = {}


def _buckets(e: int, inter: int, fp8: bool) -> tuple[tuple[int, MoeTiles], ...]:
    return _TILES.get((e, inter, "fp8" if fp8 else "bf16"), _DEFAULT)


def moe_config(e: int, inter: int, tokens: int, fp8: bool = False) -> MoeTiles:
    """Tiles for T = `tokens` tokens over E experts of intermediate size I (the table, else the defaults)."""
    return next(t for top, t in _buckets(e, inter, fp8) if tokens <= top)


def warm_up_sizes(e: int, inter: int, max_tokens: int, fp8: bool = False) -> list[int]:
    """Token counts that reach every bucket's tiles once (compile them before serving)."""
    sizes, lo = [], 1
    for top, _ in _buckets(e, inter, fp8):
        if lo > max_tokens:
            break
        sizes.append(lo)
        lo = top + 1
    return sizes


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """layers.moe.route in one launch: (weights fp32 [T, k], ids int32 [T, k]). top_k must be a power of 2
    (the renormalizing load); the caller falls back to torch otherwise."""
    t, e = logits.shape
    weights = torch.empty(t, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int32, device=logits.device)
    if t:
        _moe_route_kernel[(t,)](logits, weights, ids, e, logits.stride(0), TOPK=top_k,
                                E_P=triton.next_power_of_2(e), RENORM=renormalize, num_warps=1 if e <= 64 else 4)
    return weights, ids


def supported(hidden: int, inter: int) -> bool:
    """K steps must divide both GEMMs' K (no masks along K): H and I multiples of 16."""
    return hidden % 16 == 0 and inter % 16 == 0


def _k_step(k: int, block_k: int) -> int:
    while k % block_k:
        block_k //= 2
    return block_k


def max_padded_slots(slots: int, e: int, block_m: int) -> int:
    """Rows the aligned slot list may need: every non-empty expert (at most min(S, E)) padded by < BLOCK_M."""
    return slots + min(slots, e) * (block_m - 1)


# Up to this many slots the align is one Triton program (decode: one launch instead of ~12 torch ops);
# above, the torch ops, whose cost is small next to the GEMMs of a prefill-sized batch.
ALIGN_TRITON_MAX_SLOTS = 4096


def align_slots(topk_ids: torch.Tensor, e: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (slot ids sorted by expert, segments padded to BLOCK_M with the sentinel S;
    the expert of each BLOCK_M block, E past the last segment). Sizes depend on T only; no host sync."""
    s = topk_ids.numel()
    if 0 < s <= ALIGN_TRITON_MAX_SLOTS and (topk_ids.is_cuda or _interpreted()):
        return align_slots_triton(topk_ids, e, block_m)
    return align_slots_torch(topk_ids, e, block_m)


def align_slots_triton(topk_ids: torch.Tensor, e: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    s = topk_ids.numel()
    rows = max_padded_slots(s, e, block_m)
    blocks = triton.cdiv(rows, block_m)
    slots = torch.empty(blocks * block_m, dtype=torch.int32, device=topk_ids.device)
    experts = torch.empty(blocks, dtype=torch.int32, device=topk_ids.device)
    ids = topk_ids.reshape(-1).to(torch.int32)
    _moe_align_kernel[(1,)](ids, slots, experts, s, e, blocks * block_m, blocks, E_P=triton.next_power_of_2(e),
                            BLOCK_M=block_m, CHUNK=64, num_warps=4)
    return slots, experts


def align_slots_torch(topk_ids: torch.Tensor, e: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = topk_ids.reshape(-1).long()
    s = flat.numel()
    dev = flat.device
    counts = torch.zeros(e, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded_ends = ((counts + block_m - 1) // block_m * block_m).cumsum(0)
    order = torch.sort(flat, stable=True)[1]  # slot ids grouped by expert, in slot order within one
    sorted_experts = flat[order]
    seg_start = counts.cumsum(0) - counts
    rank = torch.arange(s, device=dev) - seg_start[sorted_experts]
    dest = (padded_ends - (counts + block_m - 1) // block_m * block_m)[sorted_experts] + rank
    rows = max_padded_slots(s, e, block_m)
    blocks = triton.cdiv(rows, block_m)
    sorted_slots = torch.full((blocks * block_m,), s, dtype=torch.int32, device=dev)
    sorted_slots[dest] = order.to(torch.int32)
    starts = torch.arange(blocks, device=dev) * block_m
    expert_ids = torch.searchsorted(padded_ends, starts, right=True).to(torch.int32)
    return sorted_slots, expert_ids


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, w13_scale: torch.Tensor | None = None,
              w2_scale: torch.Tensor | None = None, tiles: MoeTiles | None = None) -> torch.Tensor:
    """x [T, H]; w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I], bf16/fp16/fp32 or fp8 with fp32
    scales [E, 2I] / [E, H]; topk_weights fp32 and topk_ids [T, k] -> [T, H] in x's dtype."""
    t, hidden = x.shape
    e, two_i, _ = w13.shape
    inter = two_i // 2
    k = topk_ids.shape[1]
    if not supported(hidden, inter):
        raise ValueError(f"fused_moe needs H and I multiples of 16, got H={hidden}, I={inter}")
    if t == 0:
        return x.new_empty(0, hidden)
    if x.stride(-1) != 1:
        x = x.contiguous()
    s = t * k
    cfg = tiles or moe_config(e, inter, t, w13_scale is not None)
    bm = cfg.block_m
    slots, experts = align_slots(topk_ids, e, bm)
    blocks = experts.numel()
    dot_fp32 = _interpreted() or x.dtype == torch.float32
    h = torch.empty(s, inter, dtype=x.dtype, device=x.device)
    g = cfg.gate_up
    _moe_gate_up_kernel[(blocks * triton.cdiv(inter, g.block_n),)](
        x, w13, w13_scale if w13_scale is not None else w13, h, slots, experts, s, k, e, inter, hidden,
        x.stride(0), w13.stride(0), w13.stride(1), w13_scale.stride(0) if w13_scale is not None else 0,
        h.stride(0), HAS_SCALE=w13_scale is not None, DOT_FP32=dot_fp32, BLOCK_M=bm, BLOCK_N=g.block_n,
        BLOCK_K=_k_step(hidden, g.block_k), num_warps=g.num_warps, num_stages=g.num_stages)
    y = torch.empty(s, hidden, dtype=torch.float32, device=x.device)
    rw = topk_weights.reshape(-1).float().contiguous()
    d = cfg.down
    _moe_down_kernel[(blocks * triton.cdiv(hidden, d.block_n),)](
        h, w2, w2_scale if w2_scale is not None else w2, rw, y, slots, experts, s, e, hidden, inter,
        h.stride(0), w2.stride(0), w2.stride(1), w2_scale.stride(0) if w2_scale is not None else 0,
        y.stride(0), HAS_SCALE=w2_scale is not None, DOT_FP32=dot_fp32, BLOCK_M=bm, BLOCK_N=d.block_n,
        BLOCK_K=_k_step(inter, d.block_k), num_warps=d.num_warps, num_stages=d.num_stages)
    return y.view(t, k, hidden).sum(1).to(x.dtype)

