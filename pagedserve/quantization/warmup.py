"""Compile every quantized GEMM kernel variant at start-up, before CUDA graphs are captured.

Triton compiles a kernel variant on its first launch: 1-2 s each on an H200. Left to the first requests,
those compiles land inside timed batches (a 7B int8 engine once lost half its b=256 throughput to them).
The kernels do not specialize on M, so a variant is a tile config x split-or-not (x bias, x dtype); each
distinct projection is run once at both ends of every M bucket its kernel uses. Running before graph
capture also creates the split-K arrival counters (triton_quant.tile_locks) outside any capture, where
they must be made: a tensor first allocated inside a capture would be zeroed only by graph replays.
"""
from __future__ import annotations

import torch
from torch import nn

from pagedserve.quantization.fp8_dtype import FP8


def _sizes(mod: nn.Module, max_m: int) -> tuple[int, list[int]] | None:
    """(K, the M sizes to run) for a quantized linear on CUDA, or None for anything else."""
    w = getattr(mod, "weight", None)
    if isinstance(w, torch.Tensor) and w.dtype in (FP8, torch.int8) and w.is_cuda:
        from pagedserve.quantization.triton_w8a8 import warm_up_sizes

        return w.shape[1], warm_up_sizes("int8" if w.dtype == torch.int8 else "fp8", max_m)
    qw = getattr(mod, "qweight", None)
    if getattr(mod, "kstrided", False) and qw.is_cuda:  # AWQ: Triton below the dense switch, one dense call
        from pagedserve.quantization.dispatch import dense_from_m
        from pagedserve.quantization.triton_quant import awq_warm_up_sizes

        k, n = mod.in_features, mod.out_features
        dense = dense_from_m("awq", n, k)
        sizes = awq_warm_up_sizes(min(max_m, dense - 1))
        return k, sizes + ([dense] if dense <= max_m else [])
    return None


def warm_up(model: nn.Module, dtype: torch.dtype, max_m: int) -> int:
    """Run each distinct quantized projection at its warm-up sizes; returns the number of calls made."""
    calls, seen = 0, set()
    with torch.no_grad():
        for mod in model.modules():
            plan = _sizes(mod, max_m)
            if plan is None:
                continue
            params = tuple((p.dtype, tuple(p.shape)) for p in mod.parameters(recurse=False))
            key = (type(mod), params)
            if key in seen:
                continue
            seen.add(key)
            k, sizes = plan
            device = next(mod.parameters()).device
            for m in sizes:
                mod(torch.zeros(m, k, dtype=dtype, device=device))
                calls += 1
    return calls
