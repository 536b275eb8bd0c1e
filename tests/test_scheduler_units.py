"""Scheduler, built directly on a BlockManager: budget, chunking, decode priority, admission, preemption.

Milliseconds per test; tests/test_scheduler.py checks the same rules through a whole engine.
"""
from __future__ import annotations

from pagedserve.engine.sequence import Status
from tests.engine_units import chunks, make_request, make_scheduler, run_step


def test_long_prompt_is_prefilled_in_budget_sized_chunks():
    sched = make_scheduler(budget=8)
    req = make_request("a", 20)
    sched.add(req)
    assert [chunks(run_step(sched)) for _ in range(4)] == [{"a": 8}, {"a": 8}, {"a": 4}, {"a": 1}]
    assert req.seqs[0].num_computed == 21 and req.seqs[0].num_output_tokens == 2


def test_decodes_are_scheduled_before_a_new_prefill_takes_the_rest_of_the_budget():
    sched = make_scheduler(budget=10)
    for rid in ("a", "b"):
        sched.add(make_request(rid, 3))
    assert chunks(run_step(sched)) == {"a": 3, "b": 3}
    sched.add(make_request("long", 50))
    out = run_step(sched)
    # Both decodes first (one token each), then the newcomer gets what is left: 10 - 2.
    assert chunks(out) == {"a": 1, "b": 1, "long": 8}
    assert out.num_batched_tokens == 10
    assert [e.request.request_id for e in out.scheduled][:2] == ["a", "b"]


def test_budget_is_never_exceeded_and_admission_is_fcfs():
    sched = make_scheduler(budget=16, max_num_seqs=8)
    for i in range(6):
        sched.add(make_request(f"r{i}", 7))
    first = run_step(sched)
    assert first.num_batched_tokens <= 16
    assert list(chunks(first)) == ["r0", "r1", "r2"]  # 7 + 7 + 2: the third starts a chunk
    assert chunks(first)["r2"] == 2
    for _ in range(10):
        assert run_step(sched).num_batched_tokens <= 16


def test_max_num_seqs_caps_admissions():
    sched = make_scheduler(max_num_seqs=2, budget=64)
    for i in range(3):
        sched.add(make_request(f"r{i}", 4))
    out = run_step(sched)
    assert set(chunks(out)) == {"r0", "r1"}
    assert [r.request_id for r in sched.waiting] == ["r2"]
    assert sched.num_running_seqs() == 2


def test_n_reserves_all_its_slots_at_admission():
    sched = make_scheduler(max_num_seqs=4, budget=64)
    sched.add(make_request("wide", 4, n=3))
    sched.add(make_request("next", 4, n=2))
    run_step(sched)
    assert [r.request_id for r in sched.running] == ["wide"]
    assert [r.request_id for r in sched.waiting] == ["next"]  # 3 + 2 slots > 4


def test_preemption_takes_the_latest_arrival_and_requeues_it_in_arrival_order():
    # 6 blocks of 4 tokens: three 7-token prompts take 2 blocks each; the first decode that crosses
    # a block boundary needs a 7th block, so someone must go.
    sched = make_scheduler(num_blocks=6, block_size=4, budget=64)
    reqs = [make_request(f"r{i}", 7) for i in range(3)]
    for r in reqs:
        sched.add(r)
    run_step(sched)  # prefill all three: 8 tokens each after the sampled one
    run_step(sched)  # decode position 7: still in the second block
    out = run_step(sched)  # position 8 needs a third block each
    assert [r.request_id for r in out.preempted] == ["r2"]
    assert reqs[2].status == Status.WAITING and reqs[2].seqs[0].num_computed == 0
    assert reqs[2].seqs[0].block_table == []
    assert [r.request_id for r in sched.waiting] == ["r2"]
    assert sched.num_preemptions == 1
    # No admissions in a step that preempted.
    assert "r2" not in chunks(out)


def test_a_preempted_request_goes_back_ahead_of_later_arrivals():
    sched = make_scheduler(num_blocks=6, block_size=4, budget=64)
    for i in range(3):
        sched.add(make_request(f"r{i}", 7))
    run_step(sched)
    sched.add(make_request("late", 3))
    run_step(sched)
    assert run_step(sched).preempted  # r2
    assert [r.request_id for r in sched.waiting] == ["r2", "late"]


def test_remove_frees_every_block():
    sched = make_scheduler(num_blocks=16, block_size=4)
    req = make_request("a", 10)
    sched.add(req)
    run_step(sched)
    assert sched.bm.num_free_blocks < 16
    sched.remove(req)
    assert sched.bm.num_free_blocks == 16
    assert not sched.has_unfinished()


def test_prefix_cache_hit_skips_the_shared_blocks():
    sched = make_scheduler(num_blocks=32, block_size=4)
    prompt = list(range(100, 113))  # 13 tokens: 3 full blocks
    a = make_request("a", prompt)
    sched.add(a)
    run_step(sched)
    b = make_request("b", prompt)
    sched.add(b)
    out = run_step(sched)
    # Three cached blocks: b computes only the 13th token, a decodes one.
    assert chunks(out) == {"a": 1, "b": 1}
    assert b.seqs[0].block_table[:3] == a.seqs[0].block_table[:3]


def test_prompts_sharing_a_prefix_in_one_step_prefill_it_once():
    sched = make_scheduler(num_blocks=32, block_size=4, budget=64)
    prefix = list(range(200, 212))  # 3 full blocks
    sched.add(make_request("a", prefix + [1, 2]))
    sched.add(make_request("b", prefix + [3, 4]))
    assert chunks(run_step(sched)) == {"a": 14, "b": 2}


def test_beams_are_scheduled_together_or_not_at_all():
    sched = make_scheduler(budget=3, max_num_seqs=8)
    req = make_request("beam", 2, use_beam_search=True, beam_width=4)
    sched.add(req)
    run_step(sched)
    # Fork the single prompt sequence into 4 beams, as the engine's beam step does.
    parent = req.seqs[0]
    for i in range(3):
        child = parent.fork(1000 + i, 0)
        sched.bm.fork(parent, child)
        req.seqs.append(child)
    req.forked = True
    out = sched.schedule()
    assert out.scheduled == []  # 4 beams need 4 tokens; the budget is 3
    sched.max_num_batched_tokens = 4
    assert chunks(sched.schedule()) == {"beam": 4}
