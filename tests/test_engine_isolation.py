"""One request's failure inside the engine step aborts that request only (issue 14).

The fault is forced with the test-only faults of tests/doubles/faults.py, armed for the in-process
engine of the shared `llm` fixture (and disarmed afterwards)."""
from __future__ import annotations

import pytest

from pagedserve.errors import RequestFailedError
from pagedserve.sampling_params import SamplingParams
from tests.doubles.faults import Faults, install

PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time", "def add(a, b):"]


def _params(seed: int | None = None, **kw) -> SamplingParams:
    # repetition_penalty keeps the rows on the batched sampling path (not the plain-greedy argmax)
    return SamplingParams(temperature=0, max_tokens=8, repetition_penalty=1.05, seed=seed, **kw)


def _run(engine, reqs: dict[str, tuple[str, SamplingParams]]) -> tuple[dict[str, list[int]], dict[str, str]]:
    for rid, (prompt, p) in reqs.items():
        engine.add_request(rid, prompt, p)
    done, failed = {}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        failed.update(engine.take_failed())
    return done, failed


@pytest.fixture
def faults() -> Faults:
    active = install()
    yield active
    active.sample_seed = active.step_seed = None


@pytest.fixture
def engine(llm, faults):
    return llm.engine


def test_fault_in_one_requests_sampling_leaves_the_batch_running(engine, faults):
    reference, failed = _run(engine, {f"ref{i}": (p, _params()) for i, p in enumerate(PROMPTS)})
    assert not failed and len(reference) == 4
    faults.sample_seed = 777
    reqs = {f"r{i}": (p, _params()) for i, p in enumerate(PROMPTS)}
    reqs["poison"] = (PROMPTS[0], _params(seed=777))
    done, failed = _run(engine, reqs)
    assert set(failed) == {"poison"} and "injected sampling fault" in failed["poison"]
    assert "poison" not in done
    for i in range(4):  # the rest of the batch finished, with the same tokens as when run without it
        assert done[f"r{i}"] == reference[f"ref{i}"]
    assert engine.block_manager.usage() == 0.0  # the aborted request's KV blocks were freed
    assert not engine.requests


def test_fault_in_a_beam_search_request_spares_the_others(engine):
    ok, _ = _run(engine, {"a": (PROMPTS[1], _params())})

    def broken_beam_step(*a, **k):
        raise ZeroDivisionError("beam score")

    engine._beam_step = broken_beam_step  # instance attribute: only this test's engine object
    try:
        beam = SamplingParams(n=2, use_beam_search=True, max_tokens=4, temperature=0)
        done, failed = _run(engine, {"a": (PROMPTS[1], _params()), "beam": (PROMPTS[2], beam)})
    finally:
        del engine._beam_step
    assert set(failed) == {"beam"} and "ZeroDivisionError" in failed["beam"]
    assert done["a"] == ok["a"]


def test_offline_generate_raises_one_line_for_a_failed_request(llm, engine, faults):
    faults.sample_seed = 778
    with pytest.raises(RequestFailedError, match="request 1 failed in the engine"):
        llm.generate(PROMPTS[:2], [_params(), _params(seed=778)], use_tqdm=False)
    faults.sample_seed = None
    assert llm.generate(PROMPTS[:1], _params(), use_tqdm=False)[0].outputs[0].token_ids
