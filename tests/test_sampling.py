"""Sampling semantics on the default model: seeds, greedy equivalences, stops, n, logprobs, beams, penalties, detokenization."""
from __future__ import annotations

import pytest
import torch

from pagedserve import SamplingParams
from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.model.sampler import SampleRow, apply_penalties, sample

PROMPT = "A short story about a robot who learns to paint:"
PROSE = "I like cats. I like dogs. I like"  # greedy drifts into repeating itself
CHAT_HI = [{"role": "user", "content": "Say hi."}]  # the model answers briefly and ends with EOS


def _gen(llm, prompt, **kw):
    return llm.generate([prompt], SamplingParams(**kw), use_tqdm=False)[0]


def _greedy(llm, prompt, max_tokens=16, **kw):
    return _gen(llm, prompt, temperature=0, max_tokens=max_tokens, **kw).outputs[0]


@pytest.fixture(scope="module")
def ref30(llm):
    """Greedy continuation of PROMPT, 30 tokens, EOS ignored: shorter greedy runs are its prefixes."""
    return _greedy(llm, PROMPT, 30, ignore_eos=True)


@pytest.fixture(scope="module")
def prose_base(llm):
    return _greedy(llm, PROSE, 16, ignore_eos=True).token_ids


def _assert_clean(llm):
    bm = llm.engine.block_manager
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks and not llm.engine.has_unfinished_requests()


# -- seeds and greedy equivalences ----------------------------------------------------------------------------


def test_same_seed_same_output_even_when_batched(llm):
    p = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([PROMPT], p, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=0.7, seed=5, top_k=20, max_tokens=20, ignore_eos=True)]
    batch = llm.generate(["Once upon a time", PROMPT, "The weather today"], [others[0], p, others[1]],
                         use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    again = llm.generate([PROMPT], p, use_tqdm=False)[0].outputs[0].token_ids
    assert again == alone
    _assert_clean(llm)


def test_different_seeds_differ(llm):
    outs = llm.generate([PROMPT] * 4, [SamplingParams(temperature=1.0, seed=s, max_tokens=12, ignore_eos=True)
                                       for s in range(4)], use_tqdm=False)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) >= 3


@pytest.mark.parametrize("kw", [
    dict(temperature=1.0, top_k=1),
    dict(temperature=1.5, top_p=1e-6),
    dict(temperature=1e-6),
    dict(temperature=0.8, min_p=1.0),
])
def test_degenerate_sampling_equals_greedy(llm, ref30, kw):
    ref = ref30.token_ids[:12]
    got = _gen(llm, PROMPT, max_tokens=12, ignore_eos=True, seed=7, **kw).outputs[0].token_ids
    assert got == ref


def test_top_k_restricts_to_k_most_likely():
    """Sampler level: with top_k=3 every draw is one of the 3 largest logits."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 50, generator=g)
    allowed = set(logits[0].topk(3).indices.tolist())
    seen = set()
    for s in range(200):
        row = SampleRow(SamplingParams(temperature=2.0, top_k=3), [], [], torch.Generator().manual_seed(s), [])
        tok = sample(logits, [row], None, False).token_ids[0]
        assert tok in allowed
        seen.add(tok)
    assert seen == allowed


# -- stopping -----------------------------------------------------------------------------------------------


def test_max_tokens_finishes_with_length(llm):
    res = _gen(llm, PROMPT, temperature=0, max_tokens=7, ignore_eos=True)
    out = res.outputs[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length" and res.finished
    m = res.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time
    assert 0 <= m.ttft <= m.latency


def test_stop_string_excluded_or_included(llm, ref30):
    ref = ref30
    text = ref.text
    # A stop string taken from the middle of the greedy text (spanning a token boundary is fine).
    start = len(text) // 3
    stop = text[start:start + 5]
    cut = text.index(stop)
    out = _greedy(llm, PROMPT, 30, ignore_eos=True, stop=[stop, "zzzz-never"])
    assert out.text == text[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert len(out.token_ids) < 30
    assert out.token_ids == ref.token_ids[:len(out.token_ids)]
    inc = _greedy(llm, PROMPT, 30, ignore_eos=True, stop=stop, include_stop_str_in_output=True)
    assert inc.text == text[:cut + len(stop)]


def test_stop_string_never_streamed(llm, ref30):
    """Streaming deltas hold back a possible stop-string prefix: the stop text never reaches the client."""
    eng = llm.engine
    ref = ref30.text
    stop = ref[len(ref) // 2:len(ref) // 2 + 6]
    eng.add_request("stream-stop", PROMPT, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=stop))
    streamed, final = "", None
    while eng.has_unfinished_requests():
        for o in eng.step():
            streamed += o.deltas[0][0]
            assert stop not in streamed
            final = o
    assert final.finished and streamed == final.outputs[0].text == ref[:ref.index(stop)]


def test_stop_token_ids(llm, ref30):
    ref = ref30.token_ids[:20]
    i = 4
    stop_tok = ref[i]
    first = ref.index(stop_tok)
    out = _greedy(llm, PROMPT, 20, ignore_eos=True, stop_token_ids=[stop_tok])
    assert out.token_ids == ref[:first + 1]  # the stop token ends the output (its text is not shown)
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    assert out.text == llm.tokenizer.decode(ref[:first], skip_special_tokens=True)


def test_min_tokens_blocks_stops(llm, ref30):
    ref = ref30.token_ids[:20]
    stop_tok = ref[1]
    out = _greedy(llm, PROMPT, 20, ignore_eos=True, stop_token_ids=[stop_tok], min_tokens=6)
    assert len(out.token_ids) >= 7
    assert stop_tok not in out.token_ids[:6]
    assert out.finish_reason == "length" or out.token_ids[-1] == stop_tok
    # Stop strings are not checked before min_tokens either.
    text_stop = llm.tokenizer.decode(ref[:1])
    out2 = _greedy(llm, PROMPT, 20, ignore_eos=True, stop=text_stop.strip() or text_stop, min_tokens=5)
    assert len(out2.token_ids) >= 5


def test_eos_min_tokens_and_ignore_eos(llm):
    eos = llm.engine.eos_token_ids
    ref = llm.chat(CHAT_HI, SamplingParams(temperature=0, max_tokens=60), use_tqdm=False)[0].outputs[0]
    assert ref.finish_reason == "stop" and ref.token_ids[-1] in eos, "the model should end its reply with EOS"
    n = len(ref.token_ids)
    # ignore_eos: generation runs through EOS to max_tokens.
    ign = llm.chat(CHAT_HI, SamplingParams(temperature=0, max_tokens=n + 5, ignore_eos=True), use_tqdm=False)[0]
    assert ign.outputs[0].finish_reason == "length" and len(ign.outputs[0].token_ids) == n + 5
    assert ign.outputs[0].token_ids[:n] == ref.token_ids
    # min_tokens: EOS is forbidden until min_tokens outputs exist.
    mt = llm.chat(CHAT_HI, SamplingParams(temperature=0, max_tokens=n + 10, min_tokens=n + 3),
                  use_tqdm=False)[0].outputs[0]
    assert len(mt.token_ids) >= n + 3
    assert not eos & set(mt.token_ids[:n + 3])
    assert mt.token_ids[:n - 1] == ref.token_ids[:n - 1]


# -- n > 1 ----------------------------------------------------------------------------------------------------


def test_n_outputs_share_prompt_blocks(llm):
    eng = llm.engine
    prompt = "Shared prompt for several samples: " + "the quick brown fox jumps over the lazy dog. " * 4
    eng.add_request("n4", prompt, SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=10, ignore_eos=True))
    req = eng.requests["n4"]
    while len(req.seqs) == 1:
        eng.step()
    n_prompt = len(req.prompt_token_ids)
    full = n_prompt // eng.config.block_size
    tables = [s.block_table for s in req.seqs]
    assert len(tables) == 4
    for b in tables[0][:full]:
        assert all(t[:full] == tables[0][:full] for t in tables)
        assert eng.block_manager.blocks[b].ref_count == 4
    final = None
    while eng.has_unfinished_requests():
        for o in eng.step():
            final = o
    assert final.finished and [o.index for o in final.outputs] == [0, 1, 2, 3]
    assert all(len(o.token_ids) == 10 for o in final.outputs)
    assert len({tuple(o.token_ids) for o in final.outputs}) >= 3
    _assert_clean(llm)


# -- logprobs ---------------------------------------------------------------------------------------------------


def _hf_logprobs(hf_model, prompt_ids, out_ids):
    model, _ = hf_model
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids + out_ids])).logits[0].float()
    return torch.log_softmax(logits[len(prompt_ids) - 1:len(prompt_ids) + len(out_ids) - 1], dim=-1)


def test_logprobs_match_hf_for_greedy(llm, hf_model):
    out = _gen(llm, PROMPT, temperature=0, max_tokens=8, ignore_eos=True, logprobs=5)
    c = out.outputs[0]
    ref = _hf_logprobs(hf_model, out.prompt_token_ids, c.token_ids)
    assert len(c.logprobs) == 8
    total = 0.0
    for step, (tok, entry) in enumerate(zip(c.token_ids, c.logprobs)):
        top = ref[step].topk(5)
        assert set(entry) == set(top.indices.tolist())  # greedy: the sampled token is the top-1
        assert entry[tok].rank == 1
        for t, lp in entry.items():
            assert lp.logprob == pytest.approx(ref[step, t].item(), abs=2e-3)
            assert lp.rank == int((ref[step] > ref[step, t]).sum()) + 1
            assert lp.decoded_token == llm.tokenizer.decode([t])
        total += entry[tok].logprob
    assert c.cumulative_logprob == pytest.approx(total, abs=1e-4)


def test_logprobs_include_sampled_token(llm, hf_model):
    out = _gen(llm, PROMPT, temperature=1.5, seed=9, max_tokens=12, ignore_eos=True, logprobs=2)
    c = out.outputs[0]
    ref = _hf_logprobs(hf_model, out.prompt_token_ids, c.token_ids)
    outside_top = 0
    for step, (tok, entry) in enumerate(zip(c.token_ids, c.logprobs)):
        assert tok in entry
        assert len(entry) in (2, 3)
        assert entry[tok].logprob == pytest.approx(ref[step, tok].item(), abs=2e-3)
        if len(entry) == 3:
            outside_top += 1
            assert entry[tok].rank > 2
    assert c.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs)),
                                                 abs=1e-4)
    # logprobs=0: only the sampled token.
    z = _gen(llm, PROMPT, temperature=0, max_tokens=3, logprobs=0).outputs[0]
    assert all(list(e) == [t] for t, e in zip(z.token_ids, z.logprobs))
    # No logprobs asked: none returned.
    assert _gen(llm, PROMPT, temperature=0, max_tokens=3).outputs[0].logprobs is None


# -- beam search -------------------------------------------------------------------------------------------------


def test_beam_search_returns_distinct_ranked_beams(llm, hf_model):
    width = 3
    out = llm.beam_search([PROMPT], beam_width=width, max_tokens=8)[0]
    assert out.finished and len(out.outputs) == width
    seqs = [tuple(o.token_ids) for o in out.outputs]
    assert len(set(seqs)) == width
    scores = [o.cumulative_logprob / len(o.token_ids) for o in out.outputs]
    assert scores == sorted(scores, reverse=True)
    for o in out.outputs:  # each beam's cumulative logprob is the true log-probability of its tokens
        ref = _hf_logprobs(hf_model, out.prompt_token_ids, o.token_ids)
        true = sum(ref[i, t].item() for i, t in enumerate(o.token_ids))
        assert o.cumulative_logprob == pytest.approx(true, abs=5e-3)
        assert o.text == llm.tokenizer.decode(o.token_ids, skip_special_tokens=True)
    greedy = _greedy(llm, PROMPT, 8)
    g_ref = _hf_logprobs(hf_model, out.prompt_token_ids, greedy.token_ids)
    g_score = sum(g_ref[i, t].item() for i, t in enumerate(greedy.token_ids)) / len(greedy.token_ids)
    assert scores[0] >= g_score - 1e-4  # beams never end worse than the greedy path here
    _assert_clean(llm)


def test_beam_width_one_equals_greedy(llm, ref30):
    ref = ref30.token_ids[:10]
    out = llm.beam_search([PROMPT], beam_width=1, max_tokens=10, ignore_eos=True)[0]
    assert len(out.outputs) == 1 and out.outputs[0].token_ids == ref


def test_beam_search_via_sampling_params_returns_n_best(llm):
    p = SamplingParams(n=2, use_beam_search=True, beam_width=4, temperature=0, max_tokens=6)
    out = llm.generate([PROMPT], p, use_tqdm=False)[0]
    full = llm.beam_search([PROMPT], beam_width=4, max_tokens=6)[0]
    assert [o.token_ids for o in out.outputs] == [o.token_ids for o in full.outputs[:2]]


# -- penalties -----------------------------------------------------------------------------------------------------


def test_penalty_math_on_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    row = SampleRow(SamplingParams(repetition_penalty=2.0), [0], [1], None, [])
    apply_penalties(logits, [row])
    assert logits.tolist() == [[1.0, -4.0, 1.0, 0.5]]  # seen: positive / 2, negative * 2; unseen unchanged
    logits = torch.tensor([[1.0, 1.0, 1.0]])
    row = SampleRow(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [0], [2, 2, 1], None, [])
    apply_penalties(logits, [row])
    assert logits[0].tolist() == pytest.approx([1.0, 1.0 - 0.25 - 0.5, 1.0 - 0.5 - 0.5])


def _repeats(ids: list[int]) -> int:
    return len(ids) - len(set(ids))


def test_repetition_penalty_prevents_repeats(llm):
    prompt = "1, 2, 3, 4,"
    base = _greedy(llm, prompt, 16, ignore_eos=True).token_ids
    assert _repeats(base) > 4  # ", " over and over
    out = _greedy(llm, prompt, 16, ignore_eos=True, repetition_penalty=10.0).token_ids
    prompt_ids = set(llm.tokenizer.encode(prompt))
    assert _repeats(out) == 0
    assert not prompt_ids & set(out)


@pytest.mark.parametrize("kw", [dict(repetition_penalty=1.3), dict(frequency_penalty=1.0),
                                dict(presence_penalty=1.5), dict(presence_penalty=-1.5),
                                dict(frequency_penalty=0.5, presence_penalty=0.5, repetition_penalty=1.1)])
def test_penalties_steer_greedy_as_specified(llm, hf_model, prose_base, kw):
    """Each greedy token is the argmax of HF's logits after the penalty (HF repetition, OpenAI presence/frequency)."""
    base = prose_base
    out = _gen(llm, PROSE, temperature=0, max_tokens=16, ignore_eos=True, **kw)
    ids = out.outputs[0].token_ids
    assert ids != base, "the penalty should change this continuation"
    model, _ = hf_model
    prompt = out.prompt_token_ids
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + ids])).logits[0].float()
    rep, freq, pres = kw.get("repetition_penalty", 1.0), kw.get("frequency_penalty", 0.0), kw.get(
        "presence_penalty", 0.0)
    for i, tok in enumerate(ids):
        row = logits[len(prompt) - 1 + i].clone()
        seen = sorted(set(prompt) | set(ids[:i]))
        row[seen] = torch.where(row[seen] > 0, row[seen] / rep, row[seen] * rep)
        for t in set(ids[:i]):
            row[t] -= freq * ids[:i].count(t) + pres
        assert row[tok] >= row.max() - 1e-3, f"step {i}: token {tok} is not the penalized argmax"
    if kw.get("presence_penalty", 0) < 0:
        assert _repeats(ids) >= _repeats(base)
    elif set(kw) == {"frequency_penalty"} or set(kw) == {"presence_penalty"}:
        assert _repeats(ids) <= _repeats(base)


# -- detokenization --------------------------------------------------------------------------------------------------

MULTIBYTE = ["Emoji: 🙂🎉👩‍🔬 done", "中文测试：你好，世界！", "café naïve — ñandú", "日本語のテキスト🌸です", "mixed 🌱 and 漢字 and ü"]


@pytest.mark.parametrize("text", MULTIBYTE)
def test_incremental_detokenizer_never_emits_replacement_char(llm, text):
    tok = llm.tokenizer
    prompt = tok.encode("Say: ")
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.encode()) / 4  # multi-byte characters span several byte-level tokens
    d = IncrementalDetokenizer(tok, prompt)
    deltas = [d.step(t) for t in ids]
    assert all("\ufffd" not in x for x in deltas)
    assert "".join(deltas) == tok.decode(ids)
    assert "".join(deltas) == text


@pytest.mark.parametrize("content", ["Reply with three emoji that describe happiness.",
                                     "How do you say 'thank you' in Japanese? Use Japanese script."])
def test_streamed_deltas_multibyte_through_engine(llm, content):
    eng = llm.engine
    prompt = llm.apply_chat_template([{"role": "user", "content": content}])
    ids = llm.tokenizer.encode(prompt, add_special_tokens=False)
    eng.add_request("mb", None, SamplingParams(temperature=0, max_tokens=24), prompt_token_ids=ids)
    streamed, final = [], None
    while eng.has_unfinished_requests():
        for o in eng.step():
            streamed.append(o.deltas[0][0])
            final = o
    text = final.outputs[0].text
    assert any(ord(ch) > 0x2000 for ch in text), "expected emoji/CJK output"
    assert all("\ufffd" not in d for d in streamed)
    assert "".join(streamed) == text
    assert text == llm.tokenizer.decode(final.outputs[0].token_ids, skip_special_tokens=True)
