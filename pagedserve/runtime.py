"""CPU runtime setup for the engine process: thread pool size, OpenMP waiting, allocator preload.

Why here and not in each entry point: `pagedserve serve` runs the engine in a child process
(async_engine), the offline `LLM` in the caller's process, and both must size torch's one
intra-op pool to the cores the process may actually use (os.sched_getaffinity, not cpu_count: a
container or `taskset` gives fewer). The API-server process keeps one thread, so it never
competes with the engine for cores.

OpenMP runtime: torch's CPU wheel ships GNU OpenMP (libgomp). Intel's (libiomp5, the
`intel-openmp` wheel, a project dependency on x86-64 Linux) provides the same GOMP_* entry points,
so preloading it moves torch's parallel regions onto it; it is the runtime vLLM's CPU setup
preloads too. At batch 32 on the default model it ran 10-15% faster here. LD_PRELOAD only acts
at process start, so it is applied where pagedserve starts the engine process itself (`serve`,
the benchmarks); an in-process `LLM(...)` runs on whatever runtime its process started with.

Waiting at barriers: an idle OpenMP worker spins before it sleeps (libgomp ~300k iterations,
libiomp5 200 ms by default). When another process shares the cores (a second server, a test run,
a noisy neighbour), a spinning worker keeps the thread it waits for off the core: a 2-thread GEMM
ran 6-10x slower here than with a short spin (GOMP_SPINCOUNT=10000, KMP_BLOCKTIME=1), which on
its own costs nothing measurable. Both are set for the engine process unless the user set them
(or OMP_WAIT_POLICY).

Allocators: jemalloc (Debian's libjemalloc2) measured slower here; tcmalloc has no pip wheel. Any
malloc library can still be preloaded with PAGEDSERVE_ALLOCATOR.

Variables (documented in the README):
- PAGEDSERVE_NUM_THREADS: intra-op threads of the engine (default: the cores in this process's
  affinity mask);
- PAGEDSERVE_PRELOAD=0: start the engine process without any preload (plain libgomp);
- PAGEDSERVE_ALLOCATOR: path of a malloc library to preload in the engine process (default: none).
"""
from __future__ import annotations

import os

DEFAULT_SPINCOUNT = "10000"


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def num_threads() -> int:
    """The engine's intra-op thread count: PAGEDSERVE_NUM_THREADS, else the usable cores."""
    raw = os.environ.get("PAGEDSERVE_NUM_THREADS", "").strip()
    if raw:
        try:
            n = int(raw)
        except ValueError:
            n = 0
        if n < 1:
            from pagedserve.errors import ConfigError

            raise ConfigError(f"PAGEDSERVE_NUM_THREADS must be a positive integer, got {raw!r}",
                              param="PAGEDSERVE_NUM_THREADS")
        return n
    return cpu_cores()


def configure_engine_threads() -> int:
    """Size torch's intra-op pool for the engine process (once, before the first parallel op);
    returns the count. Inter-op parallelism is not used by the engine: one thread."""
    import torch

    n = num_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already ran: keep what is there
        pass
    return n


def configure_server_threads() -> None:
    """The API-server process does no tensor math: if something imported torch there, one thread, so
    it cannot start a pool that competes with the engine's. (torch is not imported just for this.)"""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def openmp_library() -> str | None:
    """libiomp5.so from the intel-openmp wheel (installed into this environment's lib/), if present."""
    import sys

    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        path = os.path.join(prefix, "lib", "libiomp5.so")
        if os.path.exists(path):
            return path
    return None


def engine_on_cpu(device: str) -> bool:
    """Whether an engine configured with `device` will run on the CPU, decided without importing torch
    (the server process does not): "auto" means CPU when no NVIDIA device node exists."""
    return device == "cpu" or (device == "auto" and not os.path.exists("/dev/nvidiactl"))


def engine_env(base: dict[str, str] | None = None, cpu: bool = True) -> dict[str, str]:
    """Environment for a new engine process: OpenMP runtime and spin limits, optional allocator,
    over `base` (default os.environ). Variables the user set win. A GPU engine gets no preload."""
    env = dict(os.environ if base is None else base)
    if "OMP_WAIT_POLICY" not in env:
        env.setdefault("GOMP_SPINCOUNT", DEFAULT_SPINCOUNT)
        env.setdefault("KMP_BLOCKTIME", "1")
    if not cpu or env.get("PAGEDSERVE_PRELOAD", "1") == "0":
        return env
    preload = [p for p in env.get("LD_PRELOAD", "").split(":") if p]
    for lib in (env.get("PAGEDSERVE_ALLOCATOR", "").strip(), openmp_library()):
        if lib and os.path.exists(lib) and lib not in preload:
            preload.append(lib)
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    return env


def apply_engine_env(cpu: bool = True) -> dict[str, str | None]:
    """Put engine_env()'s additions into os.environ (a spawned child inherits them); returns the old
    values for `restore_env`."""
    new = engine_env(cpu=cpu)
    old = {k: os.environ.get(k) for k, v in new.items() if os.environ.get(k) != v}
    for k in old:
        os.environ[k] = new[k]
    return old


def restore_env(old: dict[str, str | None]) -> None:
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
