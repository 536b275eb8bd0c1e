"""The engine's refusal to start, with numbers and the fix, when the model cannot fit the memory it has."""
from __future__ import annotations

import os
from pathlib import Path

from pagedserve.config import GiB
from pagedserve.errors import OutOfMemoryError
from pagedserve.plan.gpus import CUDA_CONTEXT_GIB
from pagedserve.plan.model_shapes import ModelShape, weight_bytes


def available_host_memory() -> int:
    """Bytes the OS can still hand out (MemAvailable), or physical memory where /proc is absent."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory_before_load(shape: ModelShape, dtype_bytes: int, quantization: str | None, device_type: str,
                             kv_pool_bytes: int | None, gpu_total_bytes: int | None = None,
                             gpu_memory_utilization: float = 0.9, tp: int = 1) -> None:
    """Refuse to start, with numbers and the fix, when the weights (GPU) or weights + KV pool (CPU) cannot fit.
    With tensor parallelism: per GPU on CUDA; on CPU the ranks share host memory (T KV pools)."""
    weights = weight_bytes(shape, dtype_bytes, quantization, tp)
    if device_type == "cuda":
        budget = gpu_total_bytes * gpu_memory_utilization
        if weights + CUDA_CONTEXT_GIB * GiB > budget:
            raise OutOfMemoryError(
                f"the model weights need {weights / GiB:.1f} GiB (+{CUDA_CONTEXT_GIB} GiB CUDA context) but the GPU "
                f"budget is {budget / GiB:.1f} GiB ({gpu_total_bytes / GiB:.1f} GiB x gpu_memory_utilization "
                f"{gpu_memory_utilization})",
                hint="quantize (--quantization int8/awq), split it (--tensor-parallel-size), use a bigger GPU, "
                     "or raise --gpu-memory-utilization; `pagedserve plan` shows the numbers")
        return
    avail = available_host_memory()
    weights, kv_pool_bytes = weights * tp, (kv_pool_bytes or 0) * tp
    need = weights + kv_pool_bytes
    if need > avail:
        raise OutOfMemoryError(
            f"the weights ({weights / GiB:.1f} GiB) and the KV cache ({(kv_pool_bytes or 0) / GiB:.1f} GiB) need "
            f"{need / GiB:.1f} GiB but only {avail / GiB:.1f} GiB of memory is available",
            hint="lower --kv-cache-memory (GiB) or free memory")
