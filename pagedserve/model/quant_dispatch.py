"""Which GEMM a quantized linear runs at a given batch size M (rows of the flat batch).

M is a host int, so the choice never syncs and a CUDA graph captured for a batch size keeps the path it
was captured with. The thresholds come from `benchmarks/gpu_quant.py` (7B shape, H200):

* fp8 (`FP8_TRITON_MAX_M`): below it, the weight-only Triton kernel (W8A16: e4m3 tiles converted to bf16
  in registers, split-K). Decode-sized GEMMs are bound by weight bytes, and torch's rowwise `_scaled_mm`
  (plus the activation-quant kernel) measured 2-3x slower than bf16 cuBLAS there. From it on, the W8A8
  `_scaled_mm` (FP8 tensor cores), which wins once the GEMM is bound by math (1.3-1.5x bf16 at M=2048).
* int8 (`INT8_W8A8_FROM_M`): below it, the weight-only Triton kernel (1.37x bf16 at b=1 in the engine);
  from it on, W8A8: per-token int8 activations and `torch._int_mm` on the int8 tensor cores
  (int8_w8a8.py). The weight-only kernel loses to bf16 cuBLAS at large M (0.43x at b=256), and the old
  dequantize-then-cuBLAS path was slower still, so it is gone.
* AWQ (`DENSE_FROM_M` / `DEFAULT_DENSE_FROM_M`): from it on, dequantize the whole int4 weight into a
  temporary of the compute dtype (one Triton pass) and call cuBLAS, which measured faster than the
  Triton int4 kernel at large M (M=256, down: 127 vs 224 us). `DENSE_FROM_M` maps (method, N, K) to a
  measured switch point; other shapes use the default, 256 rows (vLLM's switch point for AWQ).

Environment overrides for A/B runs: PAGEDSERVE_FP8_TRITON_MAX_M, PAGEDSERVE_INT8_W8A8_FROM_M,
PAGEDSERVE_QUANT_DENSE_M (a huge value disables the large-M path; 0 forces it where it is valid).
"""
from __future__ import annotations

import os

FP8_TRITON_MAX_M = 64
INT8_W8A8_FROM_M = 128
DEFAULT_DENSE_FROM_M = {"awq": 256}
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
