"""request_intake, built directly: each refusal names its field; capacity checks; what a request gets."""
from __future__ import annotations

import pytest
import torch

from pagedserve.config import EngineConfig
from pagedserve.engine import request_intake as intake
from pagedserve.errors import InvalidRequestError, PromptTooLongError
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


@pytest.mark.parametrize("ids,params,param", [
    ([], SamplingParams(), "prompt"),
    ([1, VOCAB], SamplingParams(), "prompt"),
    ([1, True], SamplingParams(), "prompt"),
    ([1], SamplingParams(stop_token_ids=[VOCAB]), "stop_token_ids"),
    ([1], SamplingParams(top_k=VOCAB + 1), "top_k"),
    ([1], SamplingParams(logit_bias={VOCAB: 1.0}), "logit_bias"),
])
def test_check_prompt_refuses_what_the_model_cannot_take(ids, params, param):
    refused(InvalidRequestError, param, intake.check_prompt, ids, params, VOCAB, 64)


def test_check_prompt_lengths_and_the_default_max_tokens():
    assert intake.check_prompt([1] * 10, SamplingParams(max_tokens=None), VOCAB, 64) == 54
    assert intake.check_prompt([1] * 10, SamplingParams(max_tokens=54), VOCAB, 64) == 54
    msg = refused(PromptTooLongError, "max_tokens", intake.check_prompt, [1] * 10, SamplingParams(max_tokens=55),
                  VOCAB, 64)
    assert "64" in msg and "65" in msg
    msg = refused(PromptTooLongError, "prompt", intake.check_prompt, [1] * 64, SamplingParams(), VOCAB, 64)
    assert "64 tokens" in msg


def test_request_id_in_use_is_refused():
    refused(InvalidRequestError, "request_id", intake.checked_params, SamplingParams(), "a", {"a"})
    assert intake.checked_params(None, "b", {"a"}).max_tokens == SamplingParams().max_tokens


def _config(**kw) -> EngineConfig:
    return EngineConfig(**{"block_size": 8, "max_num_seqs": 4, **kw})


def test_check_capacity_refuses_requests_that_could_never_run():
    cfg = _config()
    ok = make_request("ok", 8, max_tokens=8)
    intake.check_capacity(ok, cfg, max_num_batched_tokens=64, num_kv_blocks=2)  # 16 tokens = 2 blocks
    refused(InvalidRequestError, "max_tokens", intake.check_capacity, make_request("big", 8, max_tokens=9), cfg, 64, 2)
    refused(InvalidRequestError, "n", intake.check_capacity, make_request("wide", 2, max_tokens=2, n=5), cfg, 64, 99)
    beams = make_request("beams", 2, max_tokens=2, use_beam_search=True, beam_width=4)
    refused(InvalidRequestError, "beam_width", intake.check_capacity, beams, cfg, 3, 99)
    intake.check_capacity(beams, cfg, 4, 99)


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
