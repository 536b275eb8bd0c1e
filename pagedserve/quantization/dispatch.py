"""Which GEMM a quantized linear runs at a given batch size M (rows of the flat batch).

M is a host int, so the choice never syncs and a CUDA graph captured for a batch size keeps the path it
was captured with. From benchmarks/quant_tile_sweep.py on an H200 (results/quant_tile_sweep_h200.json),
7B shape (Qwen2.5-7B: qkv 3584->4608, o 3584->3584, gate_up 3584->37888, down 18944->3584), CUDA-graph
replays, microseconds summed over the four, bf16 cuBLAS first:

| M | bf16 | fp8 Triton W8A8 | fp8 `_scaled_mm` | int8 Triton W8A8 | int8 `_int_mm` (old) |
|---:|---:|---:|---:|---:|---:|
| 1 | 128 | 90 | - | 86 | - (weight-only kernel: 134) |
| 16 | 127 | 85 | - | 82 | - |
| 32 | 130 | 90 | 141 | 90 | 122 |
| 128 | 137 | 115 | 132 | 121 | 153 |
| 256 | 187 | 165 | 153 | 183 | 265 |
| 512 | 359 | 252 | 239 | 306 | 408 |
| 1024 | 692 | 444 | 465 | 520 | 782 |

* fp8: the Triton W8A8 kernel (triton_w8a8.py) everywhere except M in `FP8_SCALED_MM_M` = [192, 768),
  where torch's rowwise `_scaled_mm` (cuBLASLt/CUTLASS) is 5-8% faster.
* int8: the Triton W8A8 kernel at every M: it beats `_int_mm` + a separate epilogue pass everywhere and
  is at or above bf16 everywhere. A weight-only int8/fp8 GEMV (tried in the same sweep) lost to W8A8 at
  every M, so the small-M weight-only kernels are gone.
* Both need K % 16 == 0 (no masks along K); other shapes multiply a dequantized copy (correct, slow;
  no model we know has such a projection).
* AWQ (`DENSE_FROM_M` / `DEFAULT_DENSE_FROM_M` = 128): from it on, dequantize the whole int4 weight into
  a temporary of the compute dtype (one Triton pass) and call cuBLAS. Summed over the 7B layer
  (results/quant_tile_sweep_awq_h200.json) the K-strided Triton kernel takes 238 us at M=64 against the
  dense path's 343, and they meet at M=96 (358 vs 349). `DENSE_FROM_M` maps (method, N, K) to a measured
  switch point for shapes that differ.

Environment overrides for A/B runs: PAGEDSERVE_FP8_SCALED_MM_M="lo,hi" (the window; "0,0" never uses
`_scaled_mm`, "0,1000000000" always does), PAGEDSERVE_QUANT_DENSE_M (a huge value disables AWQ's large-M
path; 0 forces it).
"""
from __future__ import annotations

import os

FP8_SCALED_MM_M = (192, 768)
DEFAULT_DENSE_FROM_M = {"awq": 128}
# (method, out_features N, in_features K) -> smallest M for the AWQ dense path; from the GPU benchmark.
DENSE_FROM_M: dict[tuple[str, int, int], int] = {}


def fp8_use_scaled_mm(m: int, n: int, k: int) -> bool:
    """`torch._scaled_mm` (True) or the Triton W8A8 kernel (False) for M rows of an [N, K] fp8 weight.
    `_scaled_mm` needs K and N multiples of 16."""
    env = os.environ.get("PAGEDSERVE_FP8_SCALED_MM_M")
    lo, hi = (int(v) for v in env.split(",")) if env else FP8_SCALED_MM_M
    return lo <= m < hi and k % 16 == 0 and n % 16 == 0


def dense_from_m(method: str, n: int, k: int) -> int:
    env = os.environ.get("PAGEDSERVE_QUANT_DENSE_M")
    if env:
        return int(env)
    return DENSE_FROM_M.get((method, n, k), DEFAULT_DENSE_FROM_M[method])


def use_dense(method: str, m: int, n: int, k: int) -> bool:
    return m >= dense_from_m(method, n, k)
