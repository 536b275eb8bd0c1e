"""A grammar-compile worker process: compiles one constraint at a time against the vocabulary.

It exists so that a compile can be abandoned: xgrammar has no way to cancel a compile, and a
pathological grammar can run for minutes or allocate gigabytes. Here the parent kills the
process at the time budget, and an address-space limit turns runaway allocation into a failed
compile instead of an engine that grows without bound. The compiled grammar goes back as
xgrammar's JSON serialization (milliseconds for typical schemas).

Protocol over two pipes (multiprocessing Connections on inherited fds): the parent sends the
serialized TokenizerInfo once, the worker answers ("ready", rss_mib); then per job the parent
sends a StructuredOutputsParams and the worker answers ("ok", compiled_json, seconds, rss_mib) or
("invalid", message, param, rss_mib) for a constraint that cannot compile.
"""
from __future__ import annotations

import os
import resource
import sys
import time
from multiprocessing.connection import Connection


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def _limit_memory(extra_mib: int) -> None:
    """Cap the address space at what is mapped now plus `extra_mib`: a compile past it fails."""
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = mapped + (extra_mib << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main(rfd: int, wfd: int, memory_mib: int) -> None:
    from pagedserve.proc import die_with_parent

    die_with_parent()
    try:
        os.nice(10)  # compiles yield the CPU to the engine's steps
    except OSError:
        pass
    rx, tx = Connection(rfd, writable=False), Connection(wfd, readable=False)
    import xgrammar as xgr

    from pagedserve.errors import InvalidRequestError
    from pagedserve.structured.grammar import _clean, build_grammar

    info = xgr.TokenizerInfo.deserialize_json(rx.recv_bytes().decode())
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    _limit_memory(memory_mib)
    tx.send(("ready", rss_mib()))
    while True:
        try:
            so = rx.recv()
        except EOFError:
            return
        t0 = time.perf_counter()
        try:
            compiled = compiler.compile_grammar(build_grammar(so))
            data = compiled.serialize_json()
            del compiled
            tx.send(("ok", data, time.perf_counter() - t0, rss_mib()))
        except InvalidRequestError as e:
            tx.send(("invalid", e.message, e.param, rss_mib()))
        except Exception as e:  # noqa: BLE001 - the grammar parsed but does not compile
            if isinstance(e, MemoryError) or "bad_alloc" in str(e):  # xgrammar's C++ out of memory
                msg = (f"compiling the constraint needs more than the {memory_mib} MiB compile memory budget; "
                       f"simplify it")
            else:
                msg = f"cannot compile the constraint: {_clean(e)}"
            tx.send(("invalid", f"structured_outputs: {msg}", "structured_outputs", rss_mib()))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
