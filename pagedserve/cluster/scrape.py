"""Reading load signals: Prometheus text from backends' /metrics, and local GPU utilization.

The parser is deliberately small and tolerant: it reads only the few series the policies
use and accepts vLLM's, SGLang's and pagedserve's names (pagedserve mirrors vLLM's).
"""
from __future__ import annotations

import asyncio
import logging
import shutil

log = logging.getLogger("pagedserve.router")

# metric name -> field; several names map to one field so any of these servers works.
ENGINE_SERIES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_usage",
    "vllm:gpu_cache_usage_perc": "kv_usage",  # vLLM < 0.10
    "sglang:num_running_reqs": "running",
    "sglang:num_queue_reqs": "waiting",
    "sglang:token_usage": "kv_usage",
    "DCGM_FI_DEV_GPU_UTIL": "gpu_util",  # dcgm-exporter, 0..100
    "pagedserve:gpu_utilization_perc": "gpu_util",  # 0..100
}
_FIRST = tuple({name[0] for name in ENGINE_SERIES})


def parse_engine_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'running', 'waiting', 'kv_usage', 'gpu_util'} (those present).
    Counts are summed over label sets (several models on one server); KV usage and GPU
    utilization take the maximum. A fraction KV usage (vLLM: 0..1) is kept as a fraction."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or not line.startswith(_FIRST):
            continue
        brace = line.find("{")
        space = line.find(" ")
        if space < 0:
            continue
        if 0 <= brace < space:
            name = line[:brace]
            end = line.rfind("}")
            rest = line[end + 1:].split()
        else:
            name = line[:space]
            rest = line[space + 1:].split()
        field = ENGINE_SERIES.get(name)
        if field is None or not rest:
            continue
        try:
            value = float(rest[0])
        except ValueError:
            continue
        if value != value:  # NaN
            continue
        if field in ("running", "waiting"):
            out[field] = out.get(field, 0.0) + value
        else:
            out[field] = max(out.get(field, 0.0), value)
    return out


class LocalGpuUtil:
    """GPU utilization (0..100) per local GPU index: NVML when the nvidia-ml-py package is
    installed, else one `nvidia-smi` call per poll. `read()` returns {} when neither works."""

    def __init__(self) -> None:
        self._nvml = None
        self._smi = shutil.which("nvidia-smi")
        try:
            import pynvml  # type: ignore

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception:
            self._nvml = None

    @property
    def available(self) -> bool:
        return self._nvml is not None or self._smi is not None

    async def read(self) -> dict[int, float]:
        if self._nvml is not None:
            nv = self._nvml
            try:
                return {i: float(nv.nvmlDeviceGetUtilizationRates(nv.nvmlDeviceGetHandleByIndex(i)).gpu)
                        for i in range(nv.nvmlDeviceGetCount())}
            except Exception as e:  # pragma: no cover - needs a GPU
                log.debug("NVML read failed: %s", e)
                return {}
        if self._smi is None:
            return {}
        try:
            proc = await asyncio.create_subprocess_exec(
                self._smi, "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
            out, _ = await asyncio.wait_for(proc.communicate(), timeout=5)
        except Exception as e:  # pragma: no cover - needs a GPU
            log.debug("nvidia-smi failed: %s", e)
            return {}
        utils = {}
        for line in out.decode().splitlines():
            try:
                idx, util = (x.strip() for x in line.split(","))
                utils[int(idx)] = float(util)
            except ValueError:
                continue
        return utils
