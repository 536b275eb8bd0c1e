"""Grammar compilation under budgets (structured/compile_pool.py, manager.py), against a real xgrammar
and a real tokenizer: a compile past its time budget fails its request with a 400 and frees its slot,
one past its memory budget fails the same way, the compile queue is bounded (429), and the cache
of compiled grammars is bounded in bytes."""
from __future__ import annotations

import time

import pytest

from pagedserve.errors import InvalidRequestError, QueueFullError
from pagedserve.sampling_params import StructuredOutputsParams as SO
from pagedserve.structured import manager as manager_mod
from pagedserve.structured.manager import StructuredOutputManager
from tests.tiny_models import tokenizer


def doubling(n: int) -> str:
    """43 KB of EBNF at n=1500 whose compile does not finish (each rule refers to the next twice)."""
    return "root ::= r0\n" + "\n".join(f'r{i} ::= r{i + 1} r{i + 1} | "x"' for i in range(n)) + f'\nr{n} ::= "x"'


def wide_enum(n: int, seed: int, width: int = 200) -> SO:
    return SO(json={"type": "string", "enum": [f"{seed}-{i}-" + "abcdefghij" * (width // 10) for i in range(n)]})


def manager(**pool) -> StructuredOutputManager:
    tok = tokenizer()
    mgr = StructuredOutputManager(tok, len(tok), {tok.eos_token_id}, **pool)
    mgr.compile_async(SO(regex="[a-z]+")).result(timeout=120)  # the worker is up (importing xgrammar takes seconds)
    return mgr


def test_compile_past_its_time_budget_is_a_400_and_frees_the_slot():
    """Row 6: the doubling grammar compiled forever on the engine's thread pool."""
    mgr = manager(workers=1, budget_s=2.0)
    t0 = time.monotonic()
    with pytest.raises(InvalidRequestError, match="longer than the 2 s compile budget") as e:
        mgr.compile_async(SO(grammar=doubling(1500))).result(timeout=60)
    assert time.monotonic() - t0 < 2.0 + 1.5 and e.value.param == "structured_outputs"
    # the one slot serves the next compile; the failure is cached (the same grammar is refused at once)
    assert mgr.compile_async(SO(regex="[0-9]+")).result(timeout=60) is not None
    t0 = time.monotonic()
    with pytest.raises(InvalidRequestError, match="compile budget"):
        mgr.compile_async(SO(grammar=doubling(1500))).result(timeout=1)
    assert time.monotonic() - t0 < 0.5 and mgr.pool.timeouts == 1


def test_compile_past_its_memory_budget_is_a_400():
    mgr = manager(workers=1, memory_mib=16)
    with pytest.raises(InvalidRequestError, match="16 MiB compile memory budget"):
        mgr.compile_async(wide_enum(150, 0, width=1000)).result(timeout=120)  # ~40 MB compiled
    assert mgr.compile_async(SO(regex="[0-9]+")).result(timeout=60) is not None


def test_compile_queue_is_bounded_with_a_429():
    mgr = manager(workers=1, max_queue=2, budget_s=3.0)
    running = mgr.compile_async(SO(grammar=doubling(1500)))
    time.sleep(0.3)  # the worker has taken it: the queue is empty
    queued = [mgr.compile_async(SO(grammar=doubling(1500 + i))) for i in (1, 2)]
    with pytest.raises(QueueFullError, match="compile queue is full"):
        mgr.compile_async(SO(grammar=doubling(1600)))
    assert mgr.compile_async(SO(regex="[a-z]+")).done()  # a cached grammar does not queue
    for f in [running, *queued]:
        with pytest.raises(InvalidRequestError):
            f.result(timeout=60)


def test_cache_is_bounded_in_bytes(monkeypatch):
    """Row 5: the cache kept 512 compiled grammars whatever their size (1.1 GB for a few huge enums)."""
    mgr = manager()
    one = mgr.compile_async(wide_enum(20, -1)).result(timeout=120).memory_size_bytes
    budget = 3 * one
    monkeypatch.setattr(manager_mod, "CACHE_BYTES", budget, raising=False)
    for seed in range(8):
        mgr.compile_async(wide_enum(20, seed)).result(timeout=120)
    time.sleep(0.1)  # done callbacks
    kept = sum(f.result().memory_size_bytes for f in mgr._cache.values() if f.done() and f.exception() is None)
    assert kept <= budget and len(mgr._cache) >= 2, (kept, budget, len(mgr._cache))
