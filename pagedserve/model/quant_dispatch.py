"""Which GEMM a weight-only quantized linear runs at a given batch size M.

The Triton kernels (triton_quant.py) read int8/int4 weights and dequantize tiles in registers: at small M
the GEMM is bound by weight bytes, so fewer bytes win. At large M it is bound by math, cuBLAS's bf16 GEMM
is faster than these kernels, and reading fewer weight bytes no longer matters. There the linear switches
to the dense path: dequantize the whole weight into a temporary of the compute dtype (int8: a cast; AWQ:
one Triton pass) and call cuBLAS. That costs one extra pass over the weight (~3 bytes a weight), which a
large M amortizes: the dense path approaches bf16 speed as M grows.

The switch point depends on the GPU and the layer shape: `DENSE_FROM_M` maps (method, N, K) to the
smallest M that takes the dense path, measured by `benchmarks/gpu_quant.py` (it prints the crossover
per shape and the table to paste here). Shapes not in the table use `DEFAULT_DENSE_FROM_M`, which is
conservative: 256 rows, vLLM's switch point for AWQ, where the extra weight pass is already small next to
the GEMM. PAGEDSERVE_QUANT_DENSE_M=<M> overrides every shape (a huge value disables the dense path) for A/B
runs. M is a host int (the flat batch's rows), so the choice never syncs and a CUDA graph captured for a
batch size keeps the path it was captured with.
"""
from __future__ import annotations

import os

DEFAULT_DENSE_FROM_M = {"int8": 256, "awq": 256}
# (method, out_features N, in_features K) -> smallest M for the dense path; from the GPU benchmark.
DENSE_FROM_M: dict[tuple[str, int, int], int] = {}


def dense_from_m(method: str, n: int, k: int) -> int:
    env = os.environ.get("PAGEDSERVE_QUANT_DENSE_M")
    if env:
        return int(env)
    return DENSE_FROM_M.get((method, n, k), DEFAULT_DENSE_FROM_M[method])


def use_dense(method: str, m: int, n: int, k: int) -> bool:
    return m >= dense_from_m(method, n, k)
