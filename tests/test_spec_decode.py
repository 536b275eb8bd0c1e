"""Speculative decoding (issue 34): greedy outputs token-identical with and without drafts, the rejection
rule exact in distribution, seeds reproducible, rolled-back drafts leave no stale blocks, bad configs
refused at start-up.

One default-model engine with n-gram speculation serves the greedy tests; each workload runs with the
speculator detached (`engine.spec = None`), then attached, and every output is compared."""
from __future__ import annotations

import math

import pytest
import torch

from pagedserve import LLM
from pagedserve.errors import ConfigError
from pagedserve.sampling_params import SamplingParams, StructuredOutputsParams
from tests.tiny_models import check_engine

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
# Prompts whose continuations quote them (drafts get accepted) and free-form ones (drafts mostly miss).
PROMPTS = [
    "Copy this sentence exactly: The quick brown fox jumps over the lazy dog. Copy:",
    "def add(a, b):\n    return a + b\n\n# The same function, renamed to plus:\n",
    "1, 2, 3, 4, 5, 6,",
    "The capital of France is",
    "Repeat after me: red, green, blue, red, green, blue,",
    "Hello, my name is",
]


def _run(engine, reqs: dict[str, tuple[str, SamplingParams]], spec, check_each_step: bool = False):
    """Run `reqs` to completion with the speculator `spec` attached (None: plain decoding)."""
    saved, engine.spec = engine.spec, spec
    try:
        for rid, (prompt, p) in reqs.items():
            engine.add_request(rid, prompt, p)
        done, steps = {}, 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = [(o.token_ids, o.text, o.finish_reason, o.stop_reason,
                                             _lp(o.logprobs)) for o in out.outputs]
            if check_each_step:
                _check_rolled_back(engine)
            steps += 1
            assert steps < 5000
        assert not engine.take_failed()
    finally:
        engine.spec = saved
    check_engine(engine)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return done


def _lp(logprobs):
    """Logprobs rounded (a verify row and a decode row differ in the last float bits)."""
    if logprobs is None:
        return None
    return [{t: (round(v.logprob, 3), v.rank) for t, v in e.items()} for e in logprobs]


def _check_rolled_back(engine) -> None:
    """Between steps every sequence holds exactly the blocks of its computed tokens, as plain decoding
    leaves it: no block of a rejected draft survives the step."""
    bs = engine.block_manager.block_size
    for req in engine.scheduler.running:
        for seq in req.live_seqs:
            if seq.block_table and seq.num_tokens - seq.num_computed == 1:
                assert len(seq.block_table) == -(-seq.num_computed // bs), (seq.num_computed, seq.block_table)
    check_engine(engine)


def _compare(engine, reqs, check_each_step=False):
    spec = engine.spec
    before = spec.stats.num_accepted_tokens
    plain = _run(engine, reqs, None)
    with_spec = _run(engine, reqs, spec, check_each_step)
    assert with_spec == plain
    return spec.stats.num_accepted_tokens - before


@pytest.fixture(scope="module")
def engine():
    return LLM(max_model_len=256, kv_cache_memory=0.1, max_num_seqs=16, speculative_config=NGRAM).engine


def test_greedy_identical_mixed_batch(engine):
    """Plain greedy, logprobs, penalties, min_tokens, stop strings, n > 1 and the requests that fall back
    (beam search, a grammar) in one batch; blocks checked after every step."""
    g = dict(temperature=0.0, max_tokens=12)
    reqs = {f"p{i}": (p, SamplingParams(**g)) for i, p in enumerate(PROMPTS)}
    reqs["lp"] = (PROMPTS[0], SamplingParams(**g, logprobs=2))
    reqs["pen"] = (PROMPTS[4], SamplingParams(**g, repetition_penalty=1.3, frequency_penalty=0.5))
    reqs["min"] = (PROMPTS[2], SamplingParams(**g, min_tokens=10, stop_token_ids=[28]))
    reqs["stop"] = (PROMPTS[0], SamplingParams(**g, stop=["lazy"]))
    reqs["n2"] = (PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=10, n=2))
    reqs["beam"] = (PROMPTS[2], SamplingParams(max_tokens=6, n=2, use_beam_search=True))
    reqs["json"] = (PROMPTS[3], SamplingParams(max_tokens=8, temperature=0.0,
                                               structured_outputs=StructuredOutputsParams(choice=["Paris", "Rome"])))
    accepted = _compare(engine, reqs, check_each_step=True)
    assert accepted > 20  # the drafts really ran and were kept


def test_max_tokens_exact_and_lengths(engine):
    """Every request ends at its own max_tokens, whatever the drafts would have added."""
    reqs = {f"m{k}": (PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=k, ignore_eos=True)) for k in (1, 2, 3, 7)}
    done = _run(engine, reqs, engine.spec)
    for k in (1, 2, 3, 7):
        assert len(done[f"m{k}"][0][0]) == k


def test_greedy_identical_chunked_prefill_and_preemption(tmp_path):
    """A 24-token budget (prompts prefill in chunks, verify rows compete for budget) and a KV cache too
    small for the batch (requests are preempted and recomputed)."""
    eng = LLM(max_model_len=96, num_kv_blocks=14, block_size=8, max_num_batched_tokens=24, max_num_seqs=8,
              speculative_config=NGRAM).engine
    reqs = {f"c{i}": (p, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
            for i, p in enumerate(PROMPTS)}
    before = eng.scheduler.num_preemptions
    _compare(eng, reqs, check_each_step=True)
    assert eng.scheduler.num_preemptions > before


def test_seeded_sampling_reproduces(engine):
    reqs = {f"s{i}": (p, SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, seed=7 + i))
            for i, p in enumerate(PROMPTS[:3])}
    a = _run(engine, reqs, engine.spec)
    b = _run(engine, reqs, engine.spec)
    assert a == b


@pytest.mark.parametrize("cfg, words", [
    ({"method": "eagle9", "num_speculative_tokens": 2}, "unknown method"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2},
     "prompt_lookup_min"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 1}, "unknown key"),
    ('{"method": "ngram", ', "not valid JSON"),
])
def test_bad_config_refused_before_loading(cfg, words):
    with pytest.raises(ConfigError, match=words) as e:
        LLM(speculative_config=cfg)
    assert e.value.param == "speculative_config"
