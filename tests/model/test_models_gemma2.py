"""Gemma 2 against transformers' own implementation, prompts running well past its sliding window.

A tiny random Gemma2 (4 layers, local/global alternating, window 8, both soft-caps set) saved by
transformers and loaded by `LLM(model=dir)`: the logits at every step of a greedy generation equal one
HF forward pass over the same tokens, with the prompt prefilled in chunks that split the window, in
mixed batches, with prefix caching and under preemption.
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
    model = build_hf("gemma2")
    return model, save(model, tmp_path_factory.mktemp("gemma2"))


def _prompt(seed: int = 0, n: int = 45) -> list[int]:
    return random_prompt(seed, n)


def _hf(model, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    return hf_greedy(model, prompt, NEW)


def test_config_is_read(gemma):
    model, path = gemma
    llm = LLM(model=str(path), block_size=BLOCK, max_model_len=128, num_kv_blocks=32)
    args = llm.engine.model.args
    assert args.layer_windows == (8, 0, 8, 0) and model.config.layer_types[0] == "sliding_attention"
    assert (args.attn_softcap, args.final_softcap, args.query_pre_attn_scalar) == (4.0, 5.0, 24)
    assert [layer.self_attn.sliding_window for layer in llm.engine.model.layers] == [8, 0, 8, 0]


def test_logits_and_greedy_match_hf(gemma):
    model, path = gemma
    prompt = _prompt()
    ref_tokens, ref_logits = _hf(model, prompt)
    # a 12-token budget prefills the 45-token prompt in four chunks, each splitting a window
    llm = LLM(model=str(path), block_size=BLOCK, max_model_len=128, num_kv_blocks=64, max_num_batched_tokens=12)
    tap = LogitTap(llm.engine)
    out = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == ref_tokens
    got = torch.stack([r[3] for r in tap.rows])
    torch.testing.assert_close(got, ref_logits.float(), atol=2e-3, rtol=1e-3)
    assert got.abs().max() < 5.0  # the final soft-cap


def test_window_and_caps_change_the_result(gemma, tmp_path):
    """The test above would notice a missing window or cap: HF itself differs without them."""
    model, _ = gemma
    prompt = _prompt()
    _, ref = _hf(model, prompt)
    for change in ("window", "attention cap"):
        other = build_hf("gemma2")  # the same weights
        if change == "window":
            other.config.layer_types = ["full_attention"] * other.config.num_hidden_layers
        for layer in other.model.layers:
            if change == "window":
                layer.self_attn.sliding_window = None
            else:
                layer.self_attn.attn_logit_softcapping = None
        _, logits = _hf(other, prompt)
        assert (logits - ref).abs().max() > 1e-2, change


def test_mixed_batch_prefix_cache_and_preemption_match_hf(gemma):
    """Prompts of different lengths (some sharing a cached prefix) decoded together with prefill chunks,
    then a KV pool too small for all of them (the scheduler preempts and recomputes)."""
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_triton_kernels_match_hf(gemma):
    """On the GPU the Triton kernels take the window and the cap: fp32 greedy tokens and logits equal HF's
    (chunked prefill included), and in bf16 the captured decode graphs give the eager path's tokens."""
    model, path = gemma
    prompt = _prompt()
    ref_tokens, ref_logits = _hf(model, prompt)
    llm = LLM(model=str(path), dtype="float32", block_size=BLOCK, max_model_len=128, kv_cache_memory=0.5,
              max_num_batched_tokens=12)
    assert llm.engine.model.layers[0].self_attn.backend.name == "triton"
    tap = LogitTap(llm.engine)
    assert llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == ref_tokens
    got = torch.stack([r[3] for r in tap.rows]).cpu()
    torch.testing.assert_close(got, ref_logits.float(), atol=2e-3, rtol=1e-3)
    prompts = [_prompt(s, 10 + 9 * s) for s in range(4)]
    kw = dict(model=str(path), dtype="bfloat16", block_size=BLOCK, max_model_len=128, kv_cache_memory=0.5)
    eager = [o.outputs[0].token_ids for o in LLM(enforce_eager=True, **kw).generate(prompts, GREEDY, use_tqdm=False)]
    graphs = LLM(**kw)
    assert graphs.engine.runner.graphs, "no CUDA graphs were captured"
    assert [o.outputs[0].token_ids for o in graphs.generate(prompts, GREEDY, use_tqdm=False)] == eager
