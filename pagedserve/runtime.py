"""CPU runtime setup for the engine process: thread pool size, OpenMP waiting, allocator preload.

Why here and not in each entry point: `pagedserve serve` runs the engine in a child process
(async_engine), the offline `LLM` in the caller's process, and both must size torch's one
intra-op pool to the cores the process may actually use (os.sched_getaffinity, not cpu_count: a
container or `taskset` gives fewer). The API-server process keeps one thread, so it never
competes with the engine for cores.

OpenMP waiting: libgomp's default lets an idle worker spin for ~300k iterations before it sleeps.
When another process shares the cores (a second server, a test run, a noisy neighbour), a worker
spinning at a barrier keeps the thread it waits for off the core, and a 2-thread GEMM ran 6-10x
slower here than with a short spin (GOMP_SPINCOUNT=10000), which on a quiet machine costs nothing
measurable. It is set for the engine process unless the user set GOMP_SPINCOUNT or OMP_WAIT_POLICY.

Variables (documented in the README):
- PAGEDSERVE_NUM_THREADS: intra-op threads of the engine (default: the cores in this process's
  affinity mask);
- PAGEDSERVE_PRELOAD=0: start the engine process without the preloads below;
- PAGEDSERVE_ALLOCATOR: path of a malloc library to preload in the engine process (default: none;
  see the README's CPU section for the measurement).
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


def engine_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a new engine process: OpenMP spin limit and optional preloads, over `base`
    (default os.environ). Variables the user set win."""
    env = dict(os.environ if base is None else base)
    if "GOMP_SPINCOUNT" not in env and "OMP_WAIT_POLICY" not in env:
        env["GOMP_SPINCOUNT"] = DEFAULT_SPINCOUNT
    if env.get("PAGEDSERVE_PRELOAD", "1") != "0":
        alloc = env.get("PAGEDSERVE_ALLOCATOR", "").strip()
        if alloc and os.path.exists(alloc) and alloc not in env.get("LD_PRELOAD", ""):
            env["LD_PRELOAD"] = ":".join(p for p in (alloc, env.get("LD_PRELOAD")) if p)
    return env


def apply_engine_env() -> dict[str, str | None]:
    """Put engine_env()'s additions into os.environ (a spawned child inherits them); returns the old
    values for `restore_env`."""
    new = engine_env()
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
