"""request_intake, built directly: each refusal names its field; what a request gets (the limits a request
meets are request_checks', tested in test_request_rules.py)."""
from __future__ import annotations

import pytest
import torch

from pagedserve.engine import request_intake as intake
from pagedserve.errors import InvalidRequestError
from pagedserve.sampling_params import SamplingParams
from tests.engine_units import CharTokenizer, make_request

VOCAB = 100


def refused(exc_type, param: str, fn, *args) -> str:
    with pytest.raises(exc_type) as e:
        fn(*args)
    assert e.value.param == param, e.value
    return str(e.value)


def test_prompt_ids_win_over_text_and_text_is_tokenized():
    tok = CharTokenizer()
    assert intake.prompt_ids("ab", [5, 6], tok) == ("ab", [5, 6])
    assert intake.prompt_ids("ab", None, tok) == ("ab", [97, 98])
    assert intake.prompt_ids([3, 4], None, tok) == (None, [3, 4])
    refused(InvalidRequestError, "prompt", intake.prompt_ids, "", None, tok)
    refused(InvalidRequestError, "prompt", intake.prompt_ids, 3.5, None, tok)


def test_request_id_in_use_is_refused():
    refused(InvalidRequestError, "request_id", intake.checked_params, SamplingParams(), "a", {"a"})
    assert intake.checked_params(None, "b", {"a"}).max_tokens == SamplingParams().max_tokens


@pytest.mark.parametrize("params,plain", [
    (SamplingParams(temperature=0), True),
    (SamplingParams(temperature=0.7), False),
    (SamplingParams(temperature=0, logprobs=1), False),
    (SamplingParams(temperature=0, n=2), False),
    (SamplingParams(temperature=0, repetition_penalty=1.1), False),
    (SamplingParams(temperature=0, presence_penalty=0.5), False),
    (SamplingParams(temperature=0, logit_bias={1: 2.0}), False),
])
def test_plain_greedy_is_argmax_without_anything_that_reads_history(params, plain):
    req = intake.new_request("r", None, [1, 2], params, 8, make_request("s", 2).seqs[0], None, False)
    assert req.plain_greedy is plain


def test_new_sequence_detokenizer_logprobs_and_seeded_generators():
    tok = CharTokenizer()
    cpu = torch.device("cpu")
    seq = intake.new_sequence(0, 0, [97], SamplingParams(logprobs=2, seed=7), tok, cpu)
    assert seq.detokenizer is not None and seq.logprobs == [] and seq.generator is not None
    other = intake.new_sequence(1, 1, [97], SamplingParams(seed=7), tok, cpu)
    # Each output stream of a seeded request has its own stream of random numbers (seed + index).
    assert torch.rand(1, generator=seq.generator).item() != torch.rand(1, generator=other.generator).item()
    again = intake.new_sequence(2, 0, [97], SamplingParams(seed=7), tok, cpu)
    first = intake.new_sequence(3, 0, [97], SamplingParams(seed=7), tok, cpu)
    assert torch.rand(1, generator=again.generator).item() == torch.rand(1, generator=first.generator).item()
    beam = intake.new_sequence(4, 0, [97], SamplingParams(use_beam_search=True, beam_width=2), tok, cpu)
    assert beam.detokenizer is None and beam.generator is None
