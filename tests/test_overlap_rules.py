"""overlap.py, built directly: which requests may overlap (`SamplingParams.can_overlap`), placeholders, and
resolving them.

tests/test_overlap.py checks that whole engines give the same tokens with and without the overlap.
"""
from __future__ import annotations

import pytest
import torch

from pagedserve.engine.overlap import launch_sampling, resolve
from pagedserve.engine.scheduler import ScheduledSeq
from pagedserve.engine.sequence import PLACEHOLDER
from pagedserve.sampling_params import SamplingParams, StructuredOutputsParams
from tests.engine_units import make_request


@pytest.mark.parametrize("params,ok", [
    (dict(temperature=0), True),
    (dict(temperature=0.8, top_p=0.9, seed=3), True),
    (dict(temperature=0, stop=["x"]), True),  # stop strings are checked on the host one step late
    (dict(temperature=0, logprobs=1), False),
    (dict(temperature=0, repetition_penalty=1.2), False),
    (dict(temperature=0, presence_penalty=0.1), False),
    (dict(temperature=0, frequency_penalty=0.1), False),
    (dict(temperature=0, min_tokens=2), False),
    (dict(temperature=0, n=2), False),
    (dict(use_beam_search=True, beam_width=2), False),
    (dict(temperature=0, structured_outputs=StructuredOutputsParams(choice=["a", "b"])), False),
])
def test_only_requests_whose_sampling_reads_no_host_history_overlap(params, ok):
    assert SamplingParams(**params).can_overlap() is ok


def test_launch_leaves_placeholders_and_marks_the_last_length_limited_token():
    a = make_request("a", 3, max_tokens=5, temperature=0)
    b = make_request("b", 3, max_tokens=2, temperature=0)
    for r in (a, b):
        r.seqs[0].token_ids.append(9)  # one real output token each already
    sched = [ScheduledSeq(r.seqs[0], r, 1) for r in (a, b)]
    logits = torch.tensor([[0.0, 5.0, 0.0], [7.0, 0.0, 0.0]])
    step = launch_sampling(logits, sched, sched, torch.Generator(), max_model_len=64)
    assert step.read() == [1, 0]
    assert [s.token_ids[-1] for s in (a.seqs[0], b.seqs[0])] == [PLACEHOLDER, PLACEHOLDER]
    assert (a.seqs[0].pending_row, b.seqs[0].pending_row) == (0, 1)
    # b's in-flight token is its last (max_tokens=2): it is not scheduled again.
    assert (a.seqs[0].stop_scheduling, b.seqs[0].stop_scheduling) == (False, True)
    assert [(r.request_id, i) for r, _, i in step.rows] == [("a", 4), ("b", 4)]


def test_resolve_cuts_back_to_the_placeholder_and_returns_the_next_one():
    seq = make_request("r", [1, 2], max_tokens=8).seqs[0]
    seq.token_ids += [PLACEHOLDER, PLACEHOLDER]
    seq.pending_row = 3
    tail = resolve(seq, 2)
    assert seq.token_ids == [1, 2] and tail == [PLACEHOLDER] and seq.pending_row == 3
    seq.token_ids += [5]  # the real token, as the engine appends it
    assert resolve(seq, 3) == [] and seq.token_ids == [1, 2, 5] and seq.pending_row is None
