"""The GPUs the planner knows by name, with the memory their driver reports."""
from __future__ import annotations

from dataclasses import dataclass

from pagedserve.errors import ConfigError


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float  # what the driver reports as total (nvidia-smi), not the marketing number
    compute_capability: tuple[int, int]

    @property
    def bf16(self) -> bool:
        return self.compute_capability >= (8, 0)


GPUS = {g.name.lower(): g for g in (
    GPU("V100-16GB", 16160 / 1024, (7, 0)),
    GPU("V100-32GB", 32510 / 1024, (7, 0)),
    GPU("T4-16GB", 15360 / 1024, (7, 5)),
    GPU("A10-24GB", 23028 / 1024, (8, 6)),
    GPU("L4-24GB", 23034 / 1024, (8, 9)),
    GPU("A100-40GB", 40960 / 1024, (8, 0)),
    GPU("A100-80GB", 81920 / 1024, (8, 0)),
    GPU("H100-80GB", 81559 / 1024, (9, 0)),
    GPU("H200-141GB", 143771 / 1024, (9, 0)),
)}

# Fixed costs outside the weights and KV on a GPU: CUDA context, cuBLAS workspaces, allocator slack.
CUDA_CONTEXT_GIB = 0.75


def find_gpu(name: str) -> GPU:
    g = GPUS.get(name.lower())
    if g is None:
        raise ConfigError(f"unknown GPU {name!r}; known: {', '.join(g.name for g in GPUS.values())}",
                          param="gpu", hint="or give --gpu-memory GiB")
    return g
