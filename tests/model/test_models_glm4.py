"""GLM-4 (0414) against transformers' own implementation.

A tiny random Glm4 (partial rotary 0.5 in interleaved pairs, q/k/v bias, post-sublayer norms, fused
gate_up_proj) saved by transformers and loaded by `LLM(model=dir)`: greedy tokens and the logits at every
step equal HF's, with chunked prefill, mixed batches, prefix caching and preemption.
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
def glm(tmp_path_factory):
    model = build_hf("glm4")
    return model, save(model, tmp_path_factory.mktemp("glm4"))


def _prompt(seed: int = 0, n: int = 45) -> list[int]:
    return random_prompt(seed, n)


def _hf(model, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    return hf_greedy(model, prompt, NEW)


def test_config_is_read(glm):
    _, path = glm
    llm = LLM(model=str(path), block_size=BLOCK, max_model_len=128, num_kv_blocks=32)
    args = llm.engine.model.args
    assert (args.partial_rotary_factor, args.qkv_bias, args.o_bias) == (0.5, True, False)
    assert llm.engine.model.rope.dim == 8


def test_logits_and_greedy_match_hf(glm):
    model, path = glm
    prompt = _prompt()
    ref_tokens, ref_logits = _hf(model, prompt)
    llm = LLM(model=str(path), block_size=BLOCK, max_model_len=128, num_kv_blocks=64, max_num_batched_tokens=12)
    tap = LogitTap(llm.engine)
    assert llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == ref_tokens
    torch.testing.assert_close(torch.stack([r[3] for r in tap.rows]), ref_logits.float(), atol=2e-3, rtol=1e-3)


def test_mixed_batch_prefix_cache_and_preemption_match_hf(glm):
    model, path = glm
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
