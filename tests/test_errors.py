"""Bad input is refused with a clear `pagedserve.errors` exception naming the field, and the engine keeps serving."""
from __future__ import annotations

import math

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.errors import ConfigError, InvalidRequestError, PagedServeError, PromptTooLongError
from tests.tiny_models import VOCAB, build_hf, check_engine, save

MAX_LEN = 64


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save(build_hf("llama"), tmp_path_factory.mktemp("tiny_llama_err"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return LLM(model=str(tiny_dir), block_size=8, max_model_len=MAX_LEN, num_kv_blocks=40, max_num_seqs=4)


GOOD = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

# (SamplingParams kwargs, the field the error must name)
BAD_PARAMS = [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(max_tokens=2.5), "max_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(temperature=math.inf), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_p=-0.2), "top_p"),
    (dict(top_p=math.nan), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(n=0), "n"),
    (dict(n=-1), "n"),
    (dict(n=2.0), "n"),
    (dict(n=True), "n"),
    (dict(n=10**6), "n"),
    (dict(logprobs=-1), "logprobs"),
    (dict(logprobs=21), "logprobs"),
    (dict(logprobs=1.5), "logprobs"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=20, max_tokens=10), "min_tokens"),
    (dict(stop=""), "stop"),
    (dict(stop=["ok", 3]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(seed="abc"), "seed"),
    (dict(use_beam_search=True, beam_width=0), "beam_width"),
    (dict(use_beam_search=True, n=3, beam_width=2), "n"),
    (dict(prompt_logprobs=1), "prompt_logprobs"),
]


@pytest.mark.parametrize("kw, field", BAD_PARAMS, ids=[f"{f}={list(k.values())[-1]!r}" for k, f in BAD_PARAMS])
def test_bad_sampling_params_name_the_field(kw, field):
    with pytest.raises(InvalidRequestError) as ei:
        SamplingParams(**kw)
    assert ei.value.param == field
    assert field in str(ei.value)
    assert ei.value.status == 400


def test_params_mutated_after_construction_are_rechecked(tiny):
    p = SamplingParams(temperature=0, max_tokens=4)
    p.max_tokens = 0
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        tiny.generate([[5, 6, 7]], p, use_tqdm=False)
    assert not tiny.engine.has_unfinished_requests()


# (prompt, params, exception class, the field the error must name)
BAD_REQUESTS = [
    ("", GOOD, InvalidRequestError, "prompt"),
    ([], GOOD, InvalidRequestError, "prompt"),
    ([-1, 5], GOOD, InvalidRequestError, "prompt"),
    ([5, VOCAB], GOOD, InvalidRequestError, "prompt"),
    ([5, "6"], GOOD, InvalidRequestError, "prompt"),
    ([5, 6.0], GOOD, InvalidRequestError, "prompt"),
    ([5, True], GOOD, InvalidRequestError, "prompt"),
    (12345, GOOD, InvalidRequestError, "prompt"),
    ([7] * MAX_LEN, GOOD, PromptTooLongError, "prompt"),
    ([7] * (MAX_LEN + 30), GOOD, PromptTooLongError, "prompt"),
    ([7] * 40, SamplingParams(max_tokens=30), PromptTooLongError, "max_tokens"),
    ([5, 6], SamplingParams(n=5), InvalidRequestError, "n"),  # more than max_num_seqs=4
    ([5, 6], SamplingParams(stop_token_ids=[VOCAB + 10], min_tokens=2), InvalidRequestError, "stop_token_ids"),
    ([5, 6], SamplingParams(use_beam_search=True, beam_width=2, stop_token_ids=[10**6]), InvalidRequestError,
     "stop_token_ids"),
]


@pytest.mark.parametrize("prompt, params, exc, field", BAD_REQUESTS,
                         ids=[f"{i}-{f}" for i, (_, _, _, f) in enumerate(BAD_REQUESTS)])
def test_bad_request_refused_while_engine_keeps_serving(tiny, prompt, params, exc, field):
    eng = tiny.engine
    ref = tiny.generate([[9, 10, 11, 12]], GOOD, use_tqdm=False)[0].outputs[0].token_ids
    # A good request is in flight (prefilled, decoding) when the bad one arrives.
    eng.add_request("inflight", [9, 10, 11, 12], GOOD)
    eng.step()
    eng.step()
    with pytest.raises(exc) as ei:
        eng.add_request("bad", prompt, params)
    assert isinstance(ei.value, PagedServeError)
    assert ei.value.param == field and field in str(ei.value)
    assert "bad" not in eng.requests
    check_engine(eng)
    # The same LLM serves a new request while the in-flight one finishes, and both are right.
    after = tiny.generate([[9, 10, 11, 12]], GOOD, use_tqdm=False)[0]
    assert after.outputs[0].token_ids == ref
    assert "inflight" not in eng.requests  # LLM.generate drove the engine until it drained
    bm = eng.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_inflight_request_output_unaffected_by_bad_request(tiny):
    eng = tiny.engine
    ref = tiny.generate([[20, 21, 22]], GOOD, use_tqdm=False)[0].outputs[0].token_ids
    eng.add_request("keep", [20, 21, 22], GOOD)
    eng.step()
    with pytest.raises(InvalidRequestError):
        eng.add_request("oops", [20] * 100, GOOD)
    with pytest.raises(InvalidRequestError, match="request id") as ei:
        eng.add_request("keep", [1, 2], GOOD)  # duplicate id
    assert ei.value.param == "request_id"
    final = None
    for _ in range(100):
        for o in eng.step():
            final = o
        if not eng.has_unfinished_requests():
            break
    assert not eng.has_unfinished_requests()
    assert final.request_id == "keep" and final.outputs[0].token_ids == ref


def test_bad_prompt_in_a_batch_adds_nothing(tiny):
    with pytest.raises(InvalidRequestError):
        tiny.generate([[5, 6], [7, 8], ""], GOOD, use_tqdm=False)
    assert not tiny.engine.has_unfinished_requests()
    with pytest.raises(InvalidRequestError, match="sampling_params"):
        tiny.generate([[5, 6], [7, 8]], [GOOD], use_tqdm=False)
    outs = tiny.generate([[5, 6], [7, 8]], GOOD, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 12 for o in outs)


def test_failed_step_does_not_wedge_the_engine(tiny):
    """If a step raises (e.g. a kernel error), LLM.generate drops its requests so later calls still work."""
    eng = tiny.engine
    orig = eng.runner.execute
    calls = {"n": 0}

    def flaky(batch, *rest):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated failure")
        return orig(batch, *rest)

    eng.runner.execute = flaky
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            tiny.generate([[5, 6, 7], [8, 9]], GOOD, use_tqdm=False)
    finally:
        eng.runner.execute = orig
    assert not eng.has_unfinished_requests()
    check_engine(eng)
    out = tiny.generate([[5, 6, 7]], GOOD, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 12


# -- engine construction -----------------------------------------------------------------------------------------


def test_unknown_model_path(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ConfigError) as ei:
        LLM(model=missing)
    assert missing in str(ei.value) and ei.value.param == "model"


def test_unknown_hub_id_not_cached():
    with pytest.raises(ConfigError) as ei:
        LLM(model="no-such-org/no-such-model-xyz")
    assert "no-such-org/no-such-model-xyz" in str(ei.value) and ei.value.param == "model"


@pytest.mark.parametrize("kw, field", [
    (dict(max_model_len=10**6), "max_model_len"),
    (dict(block_size=7), "block_size"),
    (dict(dtype="float8"), "dtype"),
    (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(kv_cache_memory=-1), "kv_cache_memory"),
])
def test_bad_engine_config_names_the_field(tiny_dir, kw, field):
    with pytest.raises(ConfigError) as ei:
        LLM(model=str(tiny_dir), **kw)
    assert ei.value.param == field and field in str(ei.value)


def test_unknown_engine_option_named(tiny_dir):
    with pytest.raises(ConfigError, match="max_num_seqz"):
        LLM(model=str(tiny_dir), max_num_seqz=3)


def test_kv_pool_too_small_for_max_model_len(tiny_dir):
    with pytest.raises(ConfigError, match="max_model_len"):
        LLM(model=str(tiny_dir), max_model_len=128, block_size=8, num_kv_blocks=4)
