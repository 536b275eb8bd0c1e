"""Which GEMM a quantized linear runs at a given batch size M (rows of the flat batch).

M is a host int, so the choice never syncs and a CUDA graph captured for a batch size keeps the path it
was captured with. The thresholds come from GEMM timings in CUDA graphs on an H200, 7B shape (Qwen2.5-7B:
qkv 3584->4608, o 3584->3584, gate_up 3584->37888, down 18944->3584; microseconds summed over the four):

* fp8 (`FP8_TRITON_MAX_M` = 16): below it, the weight-only Triton kernel (W8A16: e4m3 tiles converted to
  bf16 in registers, split-K): M=1 128 us vs 144 for per-token quant + torch's rowwise `_scaled_mm`
  (bf16 cuBLAS: 128). At M=16 they tie (141/142), and from M=32 `_scaled_mm` (FP8 tensor cores) wins
  (142 vs 160 at M=32; 1.3-1.5x bf16 from M=512), mostly on gate_up.
* int8 (`INT8_W8A8_FROM_M` = 32): below it, the weight-only Triton kernel; from it on, W8A8: per-token
  int8 activations and `torch._int_mm` on the int8 tensor cores (int8_w8a8.py): M=32 122 us vs 160
  (gate_up 47 vs 90), M=256 270 vs 391. The old dequantize-then-cuBLAS path lost to both, so it is gone.
  `_int_mm` on CUDA needs M > 16 and K, N multiples of 8; other shapes stay weight-only.
* AWQ (`DENSE_FROM_M` / `DEFAULT_DENSE_FROM_M` = 128): from it on, dequantize the whole int4 weight into
  a temporary of the compute dtype (one Triton pass) and call cuBLAS: at M=128 it wins on every shape
  (e.g. qkv 26 vs 44 us), at M=64 the Triton int4 kernel still wins on gate_up (133 vs 192).
  `DENSE_FROM_M` maps (method, N, K) to a measured switch point for shapes that differ.

Environment overrides for A/B runs: PAGEDSERVE_FP8_TRITON_MAX_M, PAGEDSERVE_INT8_W8A8_FROM_M,
PAGEDSERVE_QUANT_DENSE_M (a huge value disables the large-M path; 0 forces it where it is valid).
"""
from __future__ import annotations

import os

FP8_TRITON_MAX_M = 16
INT8_W8A8_FROM_M = 32
DEFAULT_DENSE_FROM_M = {"awq": 128}
# (method, out_features N, in_features K) -> smallest M for the AWQ dense path; from the GPU benchmark.
DENSE_FROM_M: dict[tuple[str, int, int], int] = {}


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v else default


def fp8_use_triton(m: int) -> bool:
    """fp8 weight-only Triton kernel (True) or per-token W8A8 `_scaled_mm` (False) for M rows."""
    return m < _env_int("PAGEDSERVE_FP8_TRITON_MAX_M", FP8_TRITON_MAX_M)


def int8_use_w8a8(m: int, n: int, k: int) -> bool:
    """int8 W8A8 (`torch._int_mm`) for M rows of an [N, K] weight. `_int_mm` on CUDA needs M > 16 and K, N
    multiples of 8; other shapes keep the weight-only kernel."""
    return m >= _env_int("PAGEDSERVE_INT8_W8A8_FROM_M", INT8_W8A8_FROM_M) and m > 16 and k % 8 == 0 and n % 8 == 0


def dense_from_m(method: str, n: int, k: int) -> int:
    env = os.environ.get("PAGEDSERVE_QUANT_DENSE_M")
    if env:
        return int(env)
    return DENSE_FROM_M.get((method, n, k), DEFAULT_DENSE_FROM_M[method])


def use_dense(method: str, m: int, n: int, k: int) -> bool:
    return m >= dense_from_m(method, n, k)
