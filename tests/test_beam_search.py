"""BeamSearch, built directly on hand-written logits: ranking across beams, forks, pruning, ends."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from pagedserve.engine.beam_search import BeamSearch, beam_score
from pagedserve.engine.block_manager import BlockManager
from pagedserve.sampling_params import SamplingParams
from tests.engine_units import make_request

EOS = 0
VOCAB = 6


def setup(width: int = 2, max_tokens: int = 8, **params):
    bm = BlockManager(32, 8)
    search = BeamSearch(bm, {EOS}, max_model_len=64, seq_ids=itertools.count(100))
    req = make_request("b", [1, 2, 3], max_tokens, use_beam_search=True, beam_width=width, **params)
    assert bm.allocate(req.seqs[0], 3)
    req.seqs[0].num_computed = 3
    return search, req, bm


def logits(*rows: dict[int, float]) -> torch.Tensor:
    """One row per beam: token -> probability (the rest share what is left)."""
    out = torch.full((len(rows), VOCAB), 1e-9)
    for r, probs in enumerate(rows):
        for t, p in probs.items():
            out[r, t] = p
    return out.log()


def step(search, req, lg) -> bool:
    return search.step(req, [(s, i) for i, s in enumerate(req.live_seqs)], lg, now=0.0)


def test_first_step_forks_the_prompt_into_the_best_tokens_sharing_its_blocks():
    search, req, bm = setup(width=2)
    assert not step(search, req, logits({4: 0.6, 5: 0.3, 2: 0.1}))
    assert sorted(s.output_token_ids for s in req.seqs) == [[4], [5]]
    a, b = req.seqs
    assert a.block_table == b.block_table and bm.blocks[a.block_table[0]].ref_count == 2
    assert {round(s.cumulative_logprob, 4) for s in req.seqs} == {round(math.log(0.6), 4), round(math.log(0.3), 4)}


def test_ranking_is_across_beams_and_weak_beams_are_pruned():
    search, req, bm = setup(width=2)
    step(search, req, logits({4: 0.5, 5: 0.5}))
    # Beam ending in 4 has two strong continuations; the other beam none: both survivors descend from it.
    rows = {s.output_token_ids[-1]: s for s in req.seqs}
    strong, flat = logits({1: 0.5, 2: 0.5})[0], logits({t: 0.2 for t in range(1, VOCAB)})[0]
    lg = torch.stack([strong if s is rows[4] else flat for s in req.live_seqs])
    assert not step(search, req, lg)
    assert sorted(s.output_token_ids for s in req.live_seqs) == [[4, 1], [4, 2]]
    bm.check_invariants()


def test_eos_makes_a_finished_hypothesis_and_the_search_ends_when_none_can_beat_it():
    search, req, _ = setup(width=1, n=1)
    done = step(search, req, logits({EOS: 0.9, 4: 0.1}))
    assert [h.finish_reason for h in req.beam_done] == ["stop"]
    # The best live beam (log 0.1) can no longer beat the finished one (log 0.9): over.
    assert done


def test_length_limit_ends_the_search_with_every_live_beam():
    search, req, bm = setup(width=2, max_tokens=1)
    assert step(search, req, logits({4: 0.5, 5: 0.5}))
    assert sorted(h.token_ids for h in req.beam_done) == [[4], [5]]
    assert {h.finish_reason for h in req.beam_done} == {"length"}
    assert all(s.block_table == [] for s in req.seqs)
    assert bm.num_free_blocks == 32


def test_min_tokens_masks_eos():
    search, req, _ = setup(width=1, min_tokens=2)
    step(search, req, logits({EOS: 0.99, 4: 0.01}))
    assert req.beam_done == [] and req.live_seqs[0].output_token_ids == [4]


def test_beams_that_did_not_all_compute_redo_their_last_token():
    search, req, _ = setup(width=2)
    step(search, req, logits({4: 0.5, 5: 0.5}))
    first, second = req.live_seqs
    first.num_computed = first.num_tokens
    assert not search.step(req, [(first, 0)], logits({1: 1.0}), now=0.0)
    assert first.num_computed == first.num_tokens - 1 and len(req.live_seqs) == 2


@pytest.mark.parametrize("penalty,expect", [(1.0, -1.0), (0.0, -4.0), (2.0, -0.25)])
def test_beam_score_divides_by_length_to_the_penalty(penalty, expect):
    assert beam_score(-4.0, 4, SamplingParams(length_penalty=penalty)) == expect
