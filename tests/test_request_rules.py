"""The request rules with one home each: `SamplingParams.is_plain_greedy` / `can_overlap` / `can_speculate`
(checked against what the sampler really does) and `request_checks.check_request` (the engine's and the server's refusals)."""
from __future__ import annotations

import pytest
import torch

from pagedserve.engine.request_checks import EngineLimits, check_request
from pagedserve.errors import InvalidRequestError, PromptTooLongError
from pagedserve.model.sampler import SampleRow, sample_tokens
from pagedserve.sampling_params import SamplingParams, StructuredOutputsParams

V = 50
# name -> (params, is_plain_greedy, can_overlap)
CASES = {
    "greedy": (dict(temperature=0), True, True),
    "greedy_bias": (dict(temperature=0, logit_bias={3: 50.0}), False, True),
    "greedy_rep": (dict(temperature=0, repetition_penalty=1.3), False, False),
    "greedy_presence": (dict(temperature=0, presence_penalty=1.5), False, False),
    "greedy_frequency": (dict(temperature=0, frequency_penalty=1.0), False, False),
    "greedy_logprobs": (dict(temperature=0, logprobs=0), False, False),
    "greedy_min_tokens": (dict(temperature=0, min_tokens=2), True, False),
    "greedy_n2": (dict(temperature=0, n=2), False, False),
    "greedy_beam1": (dict(temperature=0, use_beam_search=True, beam_width=1), False, False),
    "greedy_grammar": (dict(temperature=0, structured_outputs=StructuredOutputsParams(regex="a+")), True, False),
    "sampled": (dict(temperature=0.8, top_p=0.9, top_k=5, min_p=0.05), False, True),
    "sampled_seed_bias": (dict(temperature=1.0, seed=7, logit_bias={1: -5.0}), False, True),
    "sampled_rep": (dict(temperature=1.0, seed=7, repetition_penalty=2.0), False, False),
}


@pytest.mark.parametrize("name", CASES)
def test_eligibility_table(name):
    kw, plain, overlap = CASES[name]
    p = SamplingParams(**kw)
    assert p.is_plain_greedy() is plain
    assert p.can_overlap() is overlap
    # drafts are verified by the same sampler, so only what decodes strictly one token a step is excluded
    assert p.can_speculate() is not (p.use_beam_search or p.structured_outputs is not None)


def _tokens(p: SamplingParams, prompt: list[int], output: list[int], logits: torch.Tensor) -> list[int]:
    gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
    rows = [SampleRow(p, prompt, output, gen, []) for _ in range(logits.shape[0])]
    return sample_tokens(logits.clone(), rows, torch.Generator().manual_seed(0)).tolist()


@pytest.mark.parametrize("name", [n for n, case in CASES.items() if case[1]])
def test_plain_greedy_means_argmax(name):
    """Whatever is plain greedy samples exactly the argmax of the logits, whatever the history."""
    p = SamplingParams(**CASES[name][0])
    logits = torch.randn(8, V, generator=torch.Generator().manual_seed(1))
    assert _tokens(p, [1, 2, 3], [4, 4, 5], logits) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("name", CASES)
def test_overlap_needs_no_history(name):
    """What may overlap samples the same token without the host's token history as with it."""
    p = SamplingParams(**CASES[name][0])
    logits = torch.rand(8, V, generator=torch.Generator().manual_seed(2))
    logits[:, 7] = 1.05  # every row's argmax, by a margin any of the penalties here overturns
    same = _tokens(p, [], [], logits) == _tokens(p, [7], [7], logits)
    if p.can_overlap():
        assert same
    elif p.has_penalties and p.greedy:
        assert not same  # the rule is not too strict: penalties really read the history


LIMITS = EngineLimits(vocab_size=V, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=3, block_size=8,
                      num_kv_blocks=10)


@pytest.mark.parametrize("ids, kw, exc, field", [
    ([], {}, InvalidRequestError, "prompt"),
    ([1, V], {}, InvalidRequestError, "prompt"),
    ([1, True], {}, InvalidRequestError, "prompt"),
    ([1, 2], dict(stop_token_ids=[V]), InvalidRequestError, "stop_token_ids"),
    ([1, 2], dict(top_k=V + 1), InvalidRequestError, "top_k"),
    ([1, 2], dict(logit_bias={V: 1.0}), InvalidRequestError, "logit_bias"),
    ([1] * 64, {}, PromptTooLongError, "prompt"),
    ([1] * 40, dict(max_tokens=30), PromptTooLongError, "max_tokens"),
    ([1, 2], dict(n=5), InvalidRequestError, "n"),
    ([1, 2], dict(use_beam_search=True, beam_width=4, temperature=0), InvalidRequestError, "beam_width"),
    ([1] * 10, dict(n=4, max_tokens=20), InvalidRequestError, "max_tokens"),  # 4 x 4 blocks > 10
])
def test_check_request_refuses(ids, kw, exc, field):
    with pytest.raises(exc) as ei:
        check_request(ids, SamplingParams(**kw), LIMITS)
    assert ei.value.param == field and field in str(ei.value)


def test_check_request_names_the_prompt_field_and_returns_max_tokens():
    with pytest.raises(InvalidRequestError) as ei:
        check_request([], SamplingParams(), LIMITS, param="messages")
    assert ei.value.param == "messages"
    assert check_request([1] * 10, SamplingParams(max_tokens=None), LIMITS) == 54
    assert check_request([1] * 10, SamplingParams(max_tokens=5), LIMITS) == 5
    assert check_request([1, 2], SamplingParams(use_beam_search=True, beam_width=3, temperature=0), LIMITS) == 16


def test_limits_from_the_engines_ready_message():
    info = {"vocab_size": V, "max_model_len": 64, "max_num_seqs": 4, "max_num_batched_tokens": 3,
            "block_size": 8, "num_kv_blocks": 10, "pid": 1, "device": "cpu"}
    assert EngineLimits.from_info(info) == LIMITS
