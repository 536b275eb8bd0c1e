"""Block manager: refcounts, free list, prefix cache (hash chain + LRU), copy-on-write, no leaks.

Unit tests drive `BlockManager` with bare `Sequence` objects; the rest run the
real engine on a tiny random-weight Llama (fast) and check the bookkeeping
after every step, including a randomized stress run with a tiny KV pool.
"""
from __future__ import annotations

import random

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.engine.block_manager import BlockManager
from pagedserve.engine.sequence import Sequence
from tests.tiny_models import LogitTap, build_hf, check_engine, save
from tests.tiny_models import check_blocks as _check

BS = 4


def _seq(tokens, seq_id=0) -> Sequence:
    return Sequence(seq_id, 0, list(tokens))


def _compute(bm: BlockManager, seq: Sequence, n: int | None = None, prefix=()) -> None:
    """Allocate and 'run' the next n tokens of seq (all remaining by default), as the engine does."""
    start = len(prefix) * BS if prefix else seq.num_computed
    n = seq.num_tokens - start if n is None else n
    assert bm.allocate(seq, n, list(prefix))
    seq.num_computed += n
    bm.commit(seq)


# -- unit tests on BlockManager ---------------------------------------------------------------------------


def test_allocate_free_refcounts_and_free_list():
    bm = BlockManager(8, BS)
    a = _seq(range(10))
    _compute(bm, a)
    assert len(a.block_table) == 3  # ceil(10 / 4)
    assert all(bm.blocks[b].ref_count == 1 for b in a.block_table)
    assert bm.num_free_blocks == 5 and not set(a.block_table) & set(bm.free)
    _check(bm, [a])
    # Decoding one more token fills block 2 (pos 10); the next one (pos 12) needs a new block.
    a.token_ids.append(99)
    _compute(bm, a, 1)
    assert len(a.block_table) == 3
    a.token_ids += [98, 97]
    _compute(bm, a, 1)
    _compute(bm, a, 1)
    assert len(a.block_table) == 4 and bm.num_free_blocks == 4
    _check(bm, [a])
    bm.free_seq(a)
    assert a.block_table == [] and a.num_computed == 0
    assert bm.num_free_blocks == 8
    _check(bm, [])


def test_allocate_is_all_or_nothing():
    bm = BlockManager(4, BS)
    a = _seq(range(12))
    _compute(bm, a)  # 3 blocks
    b = _seq(range(100, 110))  # needs 3, only 1 free
    assert not bm.can_allocate(b, 10)
    assert not bm.allocate(b, 10)
    assert b.block_table == [] and bm.num_free_blocks == 1
    _check(bm, [a, b])
    assert bm.allocate(b, 4)  # a first chunk that fits
    assert len(b.block_table) == 1 and bm.num_free_blocks == 0
    _check(bm, [a, b])


def test_prefix_hit_shares_blocks_and_leaves_a_token_to_compute():
    bm = BlockManager(16, BS)
    a = _seq(range(12))  # 3 full blocks
    _compute(bm, a)
    assert len(bm.cached) == 3
    # Same 12 tokens + 2 more: all 3 full blocks hit.
    b = _seq(list(range(12)) + [50, 51], seq_id=1)
    hits = bm.find_prefix(b)
    assert hits == a.block_table
    _compute(bm, b, prefix=hits)
    assert b.num_cached_tokens == 12 and b.block_table[:3] == a.block_table
    assert all(bm.blocks[x].ref_count == 2 for x in a.block_table)
    _check(bm, [a, b])
    # An identical 12-token prompt may only reuse 2 blocks: its last token must be computed for logits.
    c = _seq(range(12), seq_id=2)
    assert bm.find_prefix(c) == a.block_table[:2]
    # The prefix-cache counters saw the hit.
    assert bm.prefix_hits >= 12


def test_hash_chain_different_earlier_block_does_not_hit():
    bm = BlockManager(16, BS)
    A, B, C = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]
    a = _seq(A + B + C + [0])
    _compute(bm, a)
    # B at position 0 (parent differs: none instead of A) must not match a's block 1.
    assert bm.find_prefix(_seq(B + C + [0])) == []
    # A differs in one token: nothing hits even though blocks 1 and 2 are identical.
    assert bm.find_prefix(_seq([1, 2, 3, 5] + B + C + [0])) == []
    # Same first block, different second: only the first hits; C after B' is not reused.
    assert bm.find_prefix(_seq(A + [5, 6, 7, 0] + C + [0])) == a.block_table[:1]
    # A partial block never hits.
    assert bm.find_prefix(_seq(A + B + [9, 10, 11])) == a.block_table[:2]


def test_freed_cached_blocks_are_revived_from_the_lru():
    bm = BlockManager(8, BS)
    a = _seq(range(13))
    _compute(bm, a)
    table = list(a.block_table)
    bm.free_seq(a)
    assert bm.num_free_blocks == 8 and len(bm.cached) == 3  # freed but still cached
    b = _seq(list(range(12)) + [77, 78], seq_id=1)
    hits = bm.find_prefix(b)
    assert hits == table[:3]
    assert bm.can_allocate(b, 2, hits)
    _compute(bm, b, prefix=hits)
    assert b.block_table[:3] == table[:3]
    for x in table[:3]:
        assert bm.blocks[x].ref_count == 1 and x not in bm.free
    assert bm.num_free_blocks == 8 - 4
    _check(bm, [b])


def test_revived_blocks_count_against_free_space():
    bm = BlockManager(4, BS)
    a = _seq(range(12))
    _compute(bm, a)
    bm.free_seq(a)  # 3 cached free blocks + 1 never used
    b = _seq(list(range(12)) + list(range(100, 110)), seq_id=1)  # 3 hits, then 10 tokens -> 3 new blocks
    hits = bm.find_prefix(b)
    assert len(hits) == 3
    # Reviving takes 3 of the 4 free blocks; 3 more are needed but only 1 is left.
    assert not bm.can_allocate(b, 10, hits)
    assert not bm.allocate(b, 10, hits)
    assert b.block_table == [] and bm.num_free_blocks == 4
    _check(bm, [b])
    assert bm.can_allocate(b, 4, hits)


def test_lru_eviction_order():
    bm = BlockManager(6, BS)
    a = _seq(range(12))
    _compute(bm, a)  # blocks 0, 1, 2
    a_table, a_hashes = list(a.block_table), list(a.block_hashes)
    bm.free_seq(a)
    # Never-used blocks go first, then a's tail before its head (prefixes live longest).
    assert list(bm.free) == [3, 4, 5] + a_table[::-1]
    other = _seq(range(200, 216), seq_id=1)  # 4 blocks: 3, 4, 5 and a's last block
    _compute(bm, other)
    assert set(other.block_table) == {3, 4, 5, a_table[2]}
    assert a_hashes[2] not in bm.cached  # evicted from the prefix cache on reuse
    assert bm.find_prefix(_seq(list(range(12)) + [1])) == a_table[:2]  # the head survives
    _check(bm, [other])
    # Blocks freed later are evicted later: after freeing `other`, a's two older blocks go first.
    other_table = list(other.block_table)
    bm.free_seq(other)
    z = _seq(range(300, 308), seq_id=3)
    _compute(bm, z)
    assert z.block_table == a_table[:2][::-1]
    assert bm.find_prefix(_seq(list(range(200, 216)) + [0])) == other_table
    _check(bm, [z])


def test_copy_on_write_on_fork():
    bm = BlockManager(8, BS)
    parent = _seq(range(6))  # block 0 full, block 1 holds 2 tokens
    _compute(bm, parent)
    parent.token_ids.append(40)
    child = parent.fork(1, 1)
    bm.fork(parent, child)
    child.token_ids[-1] = 41
    assert child.block_table == parent.block_table
    assert all(bm.blocks[b].ref_count == 2 for b in parent.block_table)
    _check(bm, [parent, child])
    shared_partial = parent.block_table[1]
    # The child writes position 6 into the shared partial block: it gets a copy.
    assert bm.can_allocate(child, 1)
    _compute(bm, child, 1)
    assert child.block_table[0] == parent.block_table[0]  # full block still shared
    assert child.block_table[1] != shared_partial
    assert bm.pending_copies == [(shared_partial, child.block_table[1])]
    assert bm.blocks[shared_partial].ref_count == 1
    # The parent is now the only owner: it writes in place, no second copy.
    _compute(bm, parent, 1)
    assert parent.block_table[1] == shared_partial and len(bm.pending_copies) == 1
    _check(bm, [parent, child])
    bm.free_seq(child)
    bm.free_seq(parent)
    _check(bm, [])
    assert bm.num_free_blocks == 8


def test_fork_at_block_boundary_needs_no_copy():
    bm = BlockManager(8, BS)
    parent = _seq(range(8))
    _compute(bm, parent)
    parent.token_ids.append(1)
    child = parent.fork(1, 1)
    bm.fork(parent, child)
    _compute(bm, child, 1)
    _compute(bm, parent, 1)
    assert bm.pending_copies == []
    assert child.block_table[:2] == parent.block_table[:2] and child.block_table[2] != parent.block_table[2]
    _check(bm, [parent, child])


def test_copy_on_write_needs_a_free_block():
    bm = BlockManager(2, BS)
    parent = _seq(range(6))
    _compute(bm, parent)  # both blocks used
    parent.token_ids.append(1)
    child = parent.fork(1, 1)
    bm.fork(parent, child)
    assert not bm.can_allocate(child, 1)  # the copy needs a block
    assert not bm.allocate(child, 1)
    _check(bm, [parent, child])


def test_reset_prefix_cache_keeps_live_blocks():
    bm = BlockManager(8, BS)
    a, b = _seq(range(8)), _seq(range(100, 108), seq_id=1)
    _compute(bm, a)
    _compute(bm, b)
    bm.free_seq(a)
    bm.reset_prefix_cache()
    assert bm.find_prefix(_seq(list(range(8)) + [0])) == []
    assert bm.find_prefix(_seq(list(range(100, 108)) + [0])) == b.block_table
    _check(bm, [b])


def test_prefix_caching_disabled_never_hits():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = _seq(range(9))
    _compute(bm, a)
    assert bm.cached == {} and bm.find_prefix(_seq(range(9))) == []


def test_randomized_block_manager_ops():
    rng = random.Random(0)
    bm = BlockManager(12, BS)
    live: list[Sequence] = []
    ids = iter(range(10**6))
    for _ in range(2000):
        op = rng.random()
        if op < 0.3:  # new sequence, often sharing a prefix
            base = rng.choice([list(range(8)), list(range(50, 58)), []])
            s = _seq(base + [rng.randrange(5) for _ in range(rng.randint(1, 10))], next(ids))
            hits = bm.find_prefix(s)
            computed = len(hits) * BS
            n = rng.randint(1, s.num_tokens - computed)
            if bm.allocate(s, n, hits):
                s.num_computed = computed + n
                bm.commit(s)
                live.append(s)
        elif op < 0.6 and live:  # one more token (prefill chunk or decode)
            s = rng.choice(live)
            if s.num_computed == s.num_tokens:
                s.token_ids.append(rng.randrange(5))
            if bm.allocate(s, 1):
                s.num_computed += 1
                bm.commit(s)
        elif op < 0.75 and live:  # fork
            p = rng.choice(live)
            c = p.fork(next(ids), 1)
            bm.fork(p, c)
            live.append(c)
        elif live:  # finish / abort
            s = live.pop(rng.randrange(len(live)))
            bm.free_seq(s)
        bm.pending_copies.clear()
        _check(bm, live)
    for s in live:
        bm.free_seq(s)
    _check(bm, [])
    assert bm.num_free_blocks == bm.num_blocks


# -- through the engine (tiny random model) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save(build_hf("llama"), tmp_path_factory.mktemp("tiny_llama"))


def _tiny_llm(tiny_dir, **kw):
    opts = dict(block_size=8, max_model_len=128, num_kv_blocks=64, max_num_batched_tokens=64)
    opts.update(kw)
    return LLM(model=str(tiny_dir), **opts)


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(2, 384) for _ in range(n)]


def test_n_greater_than_one_cow_isolates_children(tiny_dir):
    """n=3 children share the prompt's blocks; after diverging each has its own copy of the last partial block."""
    from transformers import AutoModelForCausalLM

    llm = _tiny_llm(tiny_dir)
    eng = llm.engine
    tap = LogitTap(eng)
    prompt = _prompt(random.Random(1), 21)  # blocks of 8: two full, one partial (5 tokens)
    eng.add_request("r", prompt, SamplingParams(n=3, temperature=1.5, seed=3, max_tokens=10, ignore_eos=True))
    eng.step()  # prefill + first token for the 3 children
    req = eng.requests["r"]
    assert len(req.seqs) == 3
    tables = [s.block_table for s in req.seqs]
    assert tables[0] == tables[1] == tables[2] and len(tables[0]) == 3
    for b in tables[0]:
        assert eng.block_manager.blocks[b].ref_count == 3
    first = [s.token_ids[-1] for s in req.seqs]
    assert len(set(first)) == 3, "seeds chosen so the children diverge at once"
    partial = tables[0][2]
    snap = [(k[partial].clone(), v[partial].clone()) for k, v in eng.runner.kv_caches]
    full0 = [k[tables[0][0]].clone() for k, _ in eng.runner.kv_caches]
    check_engine(eng)

    eng.step()  # each child writes its own token at position 21 (slot 5 of the partial block)
    check_engine(eng)
    new_tables = [s.block_table for s in req.seqs]
    lasts = [t[2] for t in new_tables]
    assert len(set(lasts)) == 3 and partial in lasts  # two copies + the original
    assert all(t[:2] == tables[0][:2] for t in new_tables)  # full blocks still shared
    for layer, (k, v) in enumerate(eng.runner.kv_caches):
        for b in lasts:  # the prompt's 5 tokens are intact in every copy
            torch.testing.assert_close(k[b, :5], snap[layer][0][:5], rtol=0, atol=0)
            torch.testing.assert_close(v[b, :5], snap[layer][1][:5], rtol=0, atol=0)
        torch.testing.assert_close(k[tables[0][0]], full0[layer], rtol=0, atol=0)
    k0 = eng.runner.kv_caches[0][0]
    # Layer-0 K at slot 5 depends only on the token there: three different tokens, three different keys.
    assert not torch.equal(k0[lasts[0], 5], k0[lasts[1], 5])
    assert not torch.equal(k0[lasts[1], 5], k0[lasts[2], 5])

    while eng.has_unfinished_requests():
        eng.step()
        check_engine(eng)
    bm = eng.block_manager
    assert bm.num_free_blocks == bm.num_blocks

    # Every child's logits at every step equal an HF forward over that child's own tokens.
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()
    outs = {s.index: s.token_ids for s in req.seqs}
    with torch.inference_mode():
        ref = {i: hf(torch.tensor([ids])).logits[0] for i, ids in outs.items()}
    checked = 0
    for rid, index, pos, logits in tap.rows:
        if pos < len(prompt):  # the prefill row, before the fork: shared by all children
            for i in ref:
                torch.testing.assert_close(logits, ref[i][pos], atol=2e-3, rtol=1e-3)
        else:
            torch.testing.assert_close(logits, ref[index][pos], atol=2e-3, rtol=1e-3)
            checked += 1
    assert checked == 3 * 9


def test_n_outputs_match_independent_seeded_runs(tiny_dir):
    """Child i of a seeded n>1 request samples like a lone request seeded seed+i (no KV cross-talk)."""
    llm = _tiny_llm(tiny_dir)
    prompt = _prompt(random.Random(2), 19)
    multi = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True),
                         use_tqdm=False)[0]
    singles = llm.generate([prompt] * 3, [SamplingParams(temperature=1.0, seed=11 + i, max_tokens=12, ignore_eos=True)
                                          for i in range(3)], use_tqdm=False)
    assert [o.token_ids for o in multi.outputs] == [s.outputs[0].token_ids for s in singles]
    assert len({tuple(o.token_ids) for o in multi.outputs}) == 3


def _abort_scenario(tiny_dir, when: str, params: SamplingParams):
    llm = _tiny_llm(tiny_dir, max_num_batched_tokens=16, max_num_seqs=4)
    eng = llm.engine
    rng = random.Random(5)
    # Another request keeps running throughout; it must finish normally.
    eng.add_request("other", _prompt(rng, 10), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    if when == "waiting":  # max_num_seqs=4 with another 4-slot request running: the victim must wait
        eng.add_request("hog", _prompt(rng, 5), SamplingParams(n=3, temperature=1, max_tokens=30, ignore_eos=True))
    eng.add_request("victim", _prompt(rng, 40), params)
    steps = 0
    target = eng.requests["victim"]
    while True:
        seq = target.seqs[0]
        if when == "waiting" and target in eng.scheduler.waiting and steps >= 2:
            break
        if when == "mid-prefill" and 0 < seq.num_computed < seq.num_prompt_tokens:
            break
        if when == "mid-decode" and all(s.num_output_tokens >= 3 for s in target.live_seqs) and target.live_seqs:
            break
        eng.step()
        steps += 1
        check_engine(eng)
        assert steps < 50, f"never reached state {when}"
    held = {b for s in target.seqs for b in s.block_table}
    assert when == "waiting" or held
    assert eng.abort_request("victim")
    assert not eng.abort_request("victim")  # unknown now
    assert all(s.finish_reason in ("abort", "pruned") for s in target.seqs)
    check_engine(eng)
    for b in held:
        assert eng.block_manager.blocks[b].ref_count == 0
    final = None
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.request_id == "other" and o.finished:
                final = o
        check_engine(eng)
    assert final is not None and len(final.outputs[0].token_ids) == 30
    bm = eng.block_manager
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("when", ["waiting", "mid-prefill", "mid-decode"])
@pytest.mark.parametrize("kind", ["single", "n3", "beam"])
def test_abort_at_any_point_leaks_nothing(tiny_dir, when, kind):
    params = {
        "single": SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        "n3": SamplingParams(n=3, temperature=1, seed=1, max_tokens=20, ignore_eos=True),
        "beam": SamplingParams(n=2, use_beam_search=True, beam_width=3, temperature=0, max_tokens=20,
                               ignore_eos=True),
    }[kind]
    _abort_scenario(tiny_dir, when, params)


def test_randomized_engine_stress(tiny_dir):
    """Random adds (shared prefixes, n>1, beams, seeds), aborts and finishes on a pool small enough to preempt."""
    llm = _tiny_llm(tiny_dir, num_kv_blocks=24, max_num_batched_tokens=24, max_num_seqs=6)
    eng = llm.engine
    rng = random.Random(1234)
    shared = _prompt(rng, 20)
    next_id, finished, aborted = 0, 0, 0
    for _ in range(300):
        r = rng.random()
        if r < 0.25 and len(eng.requests) < 8:
            kind = rng.random()
            if kind < 0.15:
                p = SamplingParams(n=2, use_beam_search=True, beam_width=2, temperature=0,
                                   max_tokens=rng.randint(2, 12))
            elif kind < 0.35:
                p = SamplingParams(n=rng.randint(2, 3), temperature=1, seed=rng.randrange(100),
                                   max_tokens=rng.randint(1, 16))
            else:
                p = SamplingParams(temperature=rng.choice([0, 1]), max_tokens=rng.randint(1, 24),
                                   min_tokens=rng.choice([0, 1]))
            body = (shared[:rng.choice([0, 8, 16, 20])] + _prompt(rng, rng.randint(1, 30)))[:60]
            eng.add_request(f"q{next_id}", body, p)
            next_id += 1
        elif r < 0.32 and eng.requests:
            eng.abort_request(rng.choice(sorted(eng.requests)))
            aborted += 1
        outs = eng.step()
        finished += sum(o.finished for o in outs)
        check_engine(eng)
        assert eng.scheduler.num_running_seqs() <= 6
    while eng.has_unfinished_requests():
        eng.step()
        check_engine(eng)
    bm = eng.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert eng.scheduler.num_preemptions > 0, "the pool should have been small enough to preempt"
    assert finished > 10 and aborted > 5
