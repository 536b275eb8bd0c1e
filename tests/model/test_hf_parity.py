"""Greedy output must equal Hugging Face transformers token for token, under every scheduling regime."""
import pytest

from pagedserve import LLM, SamplingParams
from tests.conftest import MAX_TOKENS, PROMPTS

GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)


def _check(llm, hf_greedy):
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy
    bm = llm.engine.block_manager
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks, "blocks leaked after all requests finished"
    return outs


def test_parity_prefix_caching_on(llm, hf_greedy):
    outs = _check(llm, hf_greedy)
    # Running the batch again is served mostly from the prefix cache (every full prompt
    # block of the first run is still cached) and is still exact.
    outs2 = _check(llm, hf_greedy)
    cached2 = sum(o.num_cached_tokens for o in outs2)
    assert cached2 > sum(o.num_cached_tokens for o in outs)
    full_blocks = sum(len(o.prompt_token_ids) - 1 for o in outs2) // 16
    assert cached2 >= 16 * (full_blocks - len(PROMPTS))


def test_parity_prefix_caching_off(hf_greedy):
    llm = LLM(max_model_len=512, kv_cache_memory=0.1, enable_prefix_caching=False)
    _check(llm, hf_greedy)
    assert llm.engine.block_manager.prefix_hits == 0


def test_parity_chunked_prefill(hf_greedy):
    # A 7-token budget splits every prompt into several chunks, interleaved with decodes.
    llm = LLM(max_model_len=512, kv_cache_memory=0.1, max_num_batched_tokens=7)
    _check(llm, hf_greedy)


def test_parity_under_preemption(hf_greedy):
    # 12 blocks (192 tokens) cannot hold 10 sequences of up to ~50 tokens: the scheduler must preempt.
    llm = LLM(max_model_len=128, num_kv_blocks=12, max_num_batched_tokens=64)
    _check(llm, hf_greedy)
    assert llm.engine.scheduler.num_preemptions > 0


def test_chat_matches_hf(llm, hf_model):
    import torch

    model, tok = hf_model
    msgs = [{"role": "user", "content": "Name a large animal that lives in the ocean."}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(ids))
    out = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0]
    assert out.prompt_token_ids == ids[0].tolist()
    assert out.outputs[0].token_ids == ref[0, ids.shape[1]:].tolist()
    assert out.outputs[0].text == tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
