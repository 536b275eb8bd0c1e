"""Gemma 3 (text) against transformers' own implementation, prompts running well past its sliding window.

A tiny random Gemma3 (5 layers: local, local, global, local, local; window 8; local RoPE base 100, global
1e6 with linear scaling 4; q/k norms) saved by transformers and loaded by `LLM(model=dir)`: greedy tokens
and the logits at every step equal HF's, with chunked prefill, mixed batches, prefix caching and preemption.
"""
from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, SamplingParams
from tests.tiny_models import LogitTap, build_hf, hf_greedy, random_prompt, save

BLOCK = 8
NEW = 6
GREEDY = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    model = build_hf("gemma3")
    return model, save(model, tmp_path_factory.mktemp("gemma3"))


def _prompt(seed: int = 0, n: int = 45) -> list[int]:
    return random_prompt(seed, n)


def _hf(model, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    return hf_greedy(model, prompt, NEW)


def test_config_is_read(gemma):
    _, path = gemma
    llm = LLM(model=str(path), block_size=BLOCK, max_model_len=128, num_kv_blocks=32)
    model = llm.engine.model
    assert model.args.layer_windows == (8, 8, 0, 8, 8)
    assert (model.args.rope_theta, model.args.rope_local_theta, model.args.rope_scaling["factor"]) == (1e6, 100.0, 4.0)
    assert [layer.local for layer in model.layers] == [True, True, False, True, True]


def test_logits_and_greedy_match_hf(gemma):
    model, path = gemma
    prompt = _prompt()
    ref_tokens, ref_logits = _hf(model, prompt)
    # a 12-token budget prefills the 45-token prompt in four chunks, each splitting a window
    llm = LLM(model=str(path), block_size=BLOCK, max_model_len=128, num_kv_blocks=64, max_num_batched_tokens=12)
    tap = LogitTap(llm.engine)
    assert llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == ref_tokens
    torch.testing.assert_close(torch.stack([r[3] for r in tap.rows]), ref_logits.float(), atol=2e-3, rtol=1e-3)


def test_local_rope_base_changes_the_result(gemma):
    """The test above would notice the local layers using the global RoPE: HF itself differs."""
    model, _ = gemma
    prompt = _prompt()
    _, ref = _hf(model, prompt)
    other = build_hf("gemma3")  # the same weights
    other.model.rotary_emb.sliding_attention_inv_freq.copy_(other.model.rotary_emb.full_attention_inv_freq)
    _, logits = _hf(other, prompt)
    assert (logits - ref).abs().max() > 1e-2


def test_mixed_batch_prefix_cache_and_preemption_match_hf(gemma):
    model, path = gemma
    prompts = [_prompt(s, 10 + 9 * s) for s in range(4)]
    prompts.append(prompts[3][:24] + _prompt(9, 12))  # shares 3 full blocks with prompt 3
    refs = [_hf(model, p)[0] for p in prompts]
    llm = LLM(model=str(path), block_size=BLOCK, max_model_len=128, num_kv_blocks=64, max_num_batched_tokens=24)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == refs
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)  # again, mostly from the prefix cache
    assert [o.outputs[0].token_ids for o in outs] == refs and sum(o.num_cached_tokens for o in outs) > 0
    small = LLM(model=str(path), block_size=BLOCK, max_model_len=64, num_kv_blocks=12, max_num_batched_tokens=32)
    assert [o.outputs[0].token_ids for o in small.generate(prompts, GREEDY, use_tqdm=False)] == refs
    assert small.engine.scheduler.num_preemptions > 0
