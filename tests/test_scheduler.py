"""Scheduler: token budget, chunked prefill, decodes never starved, preemption by recompute (FCFS), prompt release.

Runs the real engine on a tiny random-weight Llama and records what the
scheduler hands the runner each step.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from pagedserve import LLM, SamplingParams
from tests.tiny_models import build_hf, check_engine, save

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save(build_hf("llama"), tmp_path_factory.mktemp("tiny_llama_sched"))


def _llm(tiny_dir, **kw):
    opts = dict(block_size=8, max_model_len=256, num_kv_blocks=128, max_num_batched_tokens=64)
    opts.update(kw)
    return LLM(model=str(tiny_dir), **opts)


@dataclass
class Step:
    chunks: dict[tuple[str, int], tuple[int, int]]  # (request id, seq index) -> (start position, num tokens)
    total: int  # tokens scheduled this step
    preempted: list[str]
    waiting_after: list[str]
    running_after: list[str]


class Recorder:
    def __init__(self, engine):
        self.steps: list[Step] = []
        sched = engine.scheduler
        orig = sched.schedule

        def schedule():
            out = orig()
            chunks, seq_ids, total = {}, set(), 0
            for e in out.scheduled:
                assert e.seq.seq_id not in seq_ids, f"sequence {e.seq.seq_id} scheduled twice in one step"
                seq_ids.add(e.seq.seq_id)
                chunks[(e.request.request_id, e.seq.index)] = (e.seq.num_computed, e.num_tokens)  # beams share index 0
                total += e.num_tokens
            self.steps.append(Step(chunks, total, [r.request_id for r in out.preempted],
                                   [r.request_id for r in sched.waiting], [r.request_id for r in sched.running]))
            return out

        sched.schedule = schedule


def _prompt(rng, n):
    return [rng.randrange(2, 384) for _ in range(n)]


def _run(eng, check=True):
    outs = {}
    for _ in range(2000):
        if not eng.has_unfinished_requests():
            break
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
        if check:
            check_engine(eng)
    assert not eng.has_unfinished_requests(), "the engine made no progress"
    return outs


def test_token_budget_and_max_num_seqs_respected_every_step(tiny_dir):
    budget, max_seqs = 24, 5
    eng = _llm(tiny_dir, max_num_batched_tokens=budget, max_num_seqs=max_seqs).engine
    rec = Recorder(eng)
    rng = random.Random(0)
    for i in range(12):
        n = rng.choice([1, 1, 2])
        eng.add_request(f"r{i}", _prompt(rng, rng.randint(3, 70)),
                        SamplingParams(n=n, temperature=1, seed=i, max_tokens=rng.randint(1, 12), ignore_eos=True))
    outs = _run(eng)
    assert len(outs) == 12
    totals = [s.total for s in rec.steps]
    assert max(totals) <= budget
    assert budget in totals, "the workload should fill the budget at least once"
    assert max(len(s.chunks) for s in rec.steps) <= max_seqs
    assert all(len(s.running_after) <= max_seqs for s in rec.steps)


def test_chunked_prefill_splits_long_prompt(tiny_dir):
    prompt = _prompt(random.Random(1), 100)
    ref = _llm(tiny_dir, max_num_batched_tokens=256).generate([prompt], SamplingParams(max_tokens=8, **GREEDY),
                                                              use_tqdm=False)[0]
    eng = _llm(tiny_dir, max_num_batched_tokens=32).engine
    rec = Recorder(eng)
    eng.add_request("long", prompt, SamplingParams(max_tokens=8, **GREEDY))
    out = _run(eng)["long"]
    chunks = [s.chunks[("long", 0)] for s in rec.steps]
    assert chunks[:4] == [(0, 32), (32, 32), (64, 32), (96, 4)]
    assert chunks[4:] == [(100 + i, 1) for i in range(7)]  # then one decode token per step
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    assert out.metrics.first_token_time is not None


def test_decodes_are_never_starved_by_a_long_prefill(tiny_dir):
    budget = 16
    eng = _llm(tiny_dir, max_num_batched_tokens=budget).engine
    rec = Recorder(eng)
    rng = random.Random(2)
    for r in ("a", "b"):
        eng.add_request(r, _prompt(rng, 5), SamplingParams(max_tokens=40, **GREEDY))
    eng.step()  # both prefilled, first tokens sampled
    eng.add_request("long", _prompt(rng, 120), SamplingParams(max_tokens=4, **GREEDY))
    lens = {r: len(eng.requests[r].seqs[0].token_ids) for r in ("a", "b")}
    prefill_steps = 0
    while eng.requests["long"].seqs[0].num_output_tokens == 0:
        eng.step()
        check_engine(eng)
        step = rec.steps[-1]
        # Every running decode got exactly one token this step ...
        for r in ("a", "b"):
            assert step.chunks[(r, 0)][1] == 1
            assert len(eng.requests[r].seqs[0].token_ids) == lens[r] + 1
            lens[r] += 1
        # ... and the long prompt took what budget was left.
        start, n = step.chunks[("long", 0)]
        assert n == min(budget - 2, 120 - start)
        prefill_steps += 1
    assert prefill_steps == -(-120 // (budget - 2))
    _run(eng)


def test_preemption_requeues_victim_at_front_and_keeps_fcfs(tiny_dir):
    rng = random.Random(3)
    prompts = {r: _prompt(rng, 14) for r in "ABCD"}
    params = SamplingParams(max_tokens=40, **GREEDY)
    ref_llm = _llm(tiny_dir)
    refs = {r: ref_llm.generate([prompts[r]], params, use_tqdm=False)[0].outputs[0].token_ids for r in "ABCD"}

    # 3 sequences of up to 54 tokens need 3 x 7 blocks; 14 blocks force preemptions. max_num_seqs=3 keeps D waiting.
    eng = _llm(tiny_dir, num_kv_blocks=14, max_num_seqs=3, max_model_len=64).engine
    rec = Recorder(eng)
    for r in "ABCD":
        eng.add_request(r, prompts[r], params)
    outs = _run(eng)
    assert {r: outs[r].outputs[0].token_ids for r in "ABCD"} == refs  # recompute is exact
    pre = [(i, s) for i, s in enumerate(rec.steps) if s.preempted]
    assert pre, "the pool is small enough that someone must be preempted"
    first_admitted = {}
    for i, s in enumerate(rec.steps):
        for (rid, _), _n in s.chunks.items():
            first_admitted.setdefault(rid, i)
    assert sorted(first_admitted, key=first_admitted.get) == list("ABCD")  # admitted in arrival order
    for i, s in pre:
        for victim in s.preempted:
            # The victim is the latest-arrived running request ...
            assert all(victim >= r for r in s.running_after)
            # ... and waits at the front of the queue, ahead of later arrivals, in arrival order.
            assert victim in s.waiting_after
            assert s.waiting_after == sorted(s.waiting_after)
            assert "D" not in s.waiting_after or s.waiting_after.index(victim) < s.waiting_after.index("D")
    assert eng.scheduler.num_preemptions == sum(len(s.preempted) for _, s in pre)


def test_preempted_request_readmitted_before_later_arrivals(tiny_dir):
    """After a preemption, the victim (older) is re-admitted before a request that arrived after it."""
    rng = random.Random(4)
    params = SamplingParams(max_tokens=40, **GREEDY)
    # A and B grow to 54 tokens = 7 blocks each: 13 blocks cannot hold both.
    eng = _llm(tiny_dir, num_kv_blocks=13, max_num_seqs=4, max_model_len=64).engine
    rec = Recorder(eng)
    for r in "AB":
        eng.add_request(r, _prompt(rng, 14), params)
    while not any(s.preempted for s in rec.steps):
        assert eng.has_unfinished_requests() and len(rec.steps) < 100
        eng.step()
        check_engine(eng)
    pre_step = len(rec.steps) - 1
    assert rec.steps[pre_step].preempted == ["B"]  # the later arrival is the victim
    eng.add_request("C", _prompt(rng, 4), SamplingParams(max_tokens=2, **GREEDY))
    assert [r.request_id for r in eng.scheduler.waiting] == ["B", "C"]
    outs = _run(eng)
    assert len(outs["B"].outputs[0].token_ids) == 40
    later = rec.steps[pre_step + 1:]
    readmit = next(i for i, s in enumerate(later) if ("B", 0) in s.chunks)
    c_first = next(i for i, s in enumerate(later) if ("C", 0) in s.chunks)
    assert readmit <= c_first
    # The recompute reuses B's full blocks from the prefix cache instead of starting at 0.
    assert later[readmit].chunks[("B", 0)][0] > 0


def test_finished_requests_free_blocks_in_the_same_step(tiny_dir):
    eng = _llm(tiny_dir).engine
    rng = random.Random(5)
    eng.add_request("short", _prompt(rng, 20), SamplingParams(max_tokens=2, **GREEDY))
    eng.add_request("long", _prompt(rng, 20), SamplingParams(max_tokens=30, **GREEDY))
    eng.add_request("n2", _prompt(rng, 20), SamplingParams(n=2, temperature=1, seed=0, max_tokens=4,
                                                          ignore_eos=True))
    bm = eng.block_manager
    seen = set()
    while eng.has_unfinished_requests():
        outs = eng.step()
        for o in outs:
            if o.finished:
                seen.add(o.request_id)
        live = [s for r in eng.scheduler.running for s in r.seqs if not s.finished]
        in_use = len({b for s in live for b in s.block_table})
        assert bm.num_blocks - bm.num_free_blocks == in_use, "a finished sequence still holds blocks"
        for rid in seen:
            assert rid not in eng.requests
    assert seen == {"short", "long", "n2"}
    assert bm.num_free_blocks == bm.num_blocks


def test_finish_by_stop_token_frees_at_once(tiny_dir):
    """A request that ends on a stop token (not length) also returns its blocks in that step."""
    llm = _llm(tiny_dir)
    eng = llm.engine
    prompt = _prompt(random.Random(6), 10)
    ref = llm.generate([prompt], SamplingParams(max_tokens=6, **GREEDY), use_tqdm=False)[0].outputs[0].token_ids
    eng.add_request("s", prompt, SamplingParams(max_tokens=20, stop_token_ids=[ref[2]], **GREEDY))
    steps = 0
    while eng.has_unfinished_requests():
        outs = eng.step()
        steps += 1
        if outs and outs[0].finished:
            assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
            assert outs[0].outputs[0].finish_reason == "stop" and outs[0].outputs[0].stop_reason == ref[2]
            assert outs[0].outputs[0].token_ids == ref[:3]
    assert steps == 3


def test_beam_width_above_token_budget_is_refused(tiny_dir):
    """All beams must decode in one step; a budget below beam_width could never schedule them (livelock)."""
    from pagedserve.errors import InvalidRequestError

    eng = _llm(tiny_dir, max_num_batched_tokens=3).engine
    with pytest.raises(InvalidRequestError) as ei:
        eng.add_request("b", [5, 6, 7], SamplingParams(n=4, use_beam_search=True, beam_width=4, temperature=0))
    assert ei.value.param == "beam_width"
    assert not eng.has_unfinished_requests()


@pytest.mark.parametrize("blocks, budget", [(18, 16), (16, 64), (22, 5)])
def test_beams_and_samples_exact_under_preemption_and_small_budgets(tiny_dir, blocks, budget):
    """Beam search, seeded n>1 and greedy requests give the same outputs on a starved engine as on a roomy one."""
    rng = random.Random(8)
    prompts = [_prompt(rng, 10), _prompt(rng, 20), _prompt(rng, 10), _prompt(rng, 10)]
    params = [SamplingParams(max_tokens=40, **GREEDY),
              SamplingParams(n=4, use_beam_search=True, beam_width=4, temperature=0, max_tokens=10, ignore_eos=True),
              SamplingParams(n=3, temperature=1, seed=5, max_tokens=30, ignore_eos=True),
              SamplingParams(max_tokens=40, **GREEDY)]
    ref = _llm(tiny_dir, max_model_len=64).generate(prompts, params, use_tqdm=False)
    eng = _llm(tiny_dir, max_model_len=64, num_kv_blocks=blocks, max_num_batched_tokens=budget).engine
    rec = Recorder(eng)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        eng.add_request(str(i), p, sp)
    outs = _run(eng)
    for i in range(4):
        assert [c.token_ids for c in outs[str(i)].outputs] == [c.token_ids for c in ref[i].outputs]
    assert max(s.total for s in rec.steps) <= budget
    if blocks < 20:
        assert eng.scheduler.num_preemptions > 0


def test_generation_stops_at_max_model_len(tiny_dir):
    llm = _llm(tiny_dir, max_model_len=40)
    prompt = _prompt(random.Random(9), 33)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 40 - 33 and out.finish_reason == "length"
    last = llm.generate([_prompt(random.Random(9), 39)], SamplingParams(temperature=0, max_tokens=None,
                                                                        ignore_eos=True), use_tqdm=False)[0]
    assert len(last.outputs[0].token_ids) == 1


def test_shared_prefix_is_prefilled_once_per_batch(tiny_dir):
    """Requests that arrive together with a common prefix: the first computes the prefix, the
    others are admitted in the same step over its blocks and compute only their suffixes; outputs
    equal those of each request run alone (no sharing possible)."""
    rng = random.Random(3)
    prefix = _prompt(rng, 40)  # 5 full blocks of 8
    prompts = [prefix + _prompt(rng, 5) for _ in range(4)]
    params = SamplingParams(max_tokens=6, **GREEDY)
    alone = [_llm(tiny_dir, max_num_batched_tokens=256, enable_prefix_caching=False).generate(
        [p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    eng = _llm(tiny_dir, max_num_batched_tokens=256).engine
    rec = Recorder(eng)
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, params)
    outs = _run(eng)
    first = rec.steps[0].chunks
    assert first[("r0", 0)] == (0, 45)
    assert all(first[(f"r{i}", 0)] == (40, 5) for i in range(1, 4)), first
    assert eng.block_manager.prefix_hits == 3 * 40
    assert [outs[f"r{i}"].outputs[0].token_ids for i in range(4)] == alone


def test_blocks_registered_by_a_step_that_never_ran_are_not_reused(tiny_dir):
    """A scheduled prefill registers its blocks early; if its request is dropped before the step
    runs, those blocks (never written) must leave the prefix cache."""
    rng = random.Random(4)
    prompt = _prompt(rng, 40)
    eng = _llm(tiny_dir, max_num_batched_tokens=256).engine
    eng.add_request("gone", prompt, SamplingParams(max_tokens=4, **GREEDY))
    out = eng.scheduler.schedule()
    assert out.scheduled[0].num_tokens == 40
    eng.scheduler.remove(eng.requests.pop("gone"))
    eng.block_manager.check_invariants()
    assert eng.block_manager.cached == {}
    ref = _llm(tiny_dir, enable_prefix_caching=False).generate([prompt], SamplingParams(max_tokens=4, **GREEDY),
                                                              use_tqdm=False)[0].outputs[0].token_ids
    eng.add_request("again", prompt, SamplingParams(max_tokens=4, **GREEDY))
    assert _run(eng)["again"].outputs[0].token_ids == ref
