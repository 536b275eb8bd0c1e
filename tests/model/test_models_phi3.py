"""Phi-3 against transformers' own implementation: fused qkv/gate_up checkpoints and LongRoPE.

A tiny random Phi3 (LongRoPE switching at 32 tokens, distinct short and long factors) saved by
transformers and loaded by `LLM(model=dir)`. The reference is HF's generate, which picks the factors per
forward step by length: a prompt past the switch runs long factors throughout; a shorter prompt keeps its
short factors; where decoding crosses the switch, HF's Phi-3 recomputes the whole cache with the long
factors, and so does the engine (the scheduler recomputes that sequence). Logits at every step and greedy
tokens must match, with chunked prefill and under preemption.
"""
from __future__ import annotations

import json

import pytest
import torch

from pagedserve import LLM, SamplingParams
from tests.tiny_models import VOCAB, LogitTap, build_hf, save

BLOCK = 8
NEW = 10
GREEDY = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    model = build_hf("phi3_longrope")
    path = save(model, tmp_path_factory.mktemp("phi3"))
    llm = LLM(model=str(path), block_size=BLOCK, max_model_len=128, num_kv_blocks=64, max_num_batched_tokens=12)
    return model, path, llm


def _prompt(seed: int, n: int) -> list[int]:
    return torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_generate(model, prompt: list[int]):
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long), pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), torch.cat(out.logits).float()


def test_rope_is_read(phi3):
    model, _, llm = phi3
    ours = llm.engine.model
    assert ours.rope.switch == 32
    # max_position_embeddings / original = 16 -> sqrt(1 + ln 16 / ln 32), as HF
    assert ours.rope.cos[0, 0].item() == pytest.approx(model.model.rotary_emb.attention_scaling, rel=1e-6)


@pytest.mark.parametrize("n", [45, 20, 26], ids=["prompt-past-switch", "short", "decode-crosses-switch"])
def test_logits_and_greedy_match_hf(phi3, n):
    model, _, llm = phi3
    prompt = _prompt(n, n)
    ref_tokens, ref_logits = _hf_generate(model, prompt)
    tap = LogitTap(llm.engine)  # a 12-token budget prefills the prompt in chunks on both sides of 32
    before = llm.engine.scheduler.num_preemptions
    out = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == ref_tokens
    assert llm.engine.scheduler.num_preemptions - before == (n < 32 < n + NEW)  # the recompute at the switch
    torch.testing.assert_close(torch.stack([r[3] for r in tap.rows]), ref_logits, atol=2e-3, rtol=1e-3)


def test_the_switch_matters(phi3):
    """Long factors throughout give other logits than short ones on the same tokens (HF itself): the tests
    above would notice factors chosen by the wrong length."""
    model, _, _ = phi3
    ids = torch.tensor([_prompt(45, 45)])
    with torch.inference_mode():
        long = model(ids).logits[0, :32]  # 45 > 32: long factors
        short = model(ids[:, :32]).logits[0]  # 32: short factors
    assert (long - short).abs().max() > 1e-2


def test_batch_with_preemption_matches_hf(phi3):
    """Prompts on both sides of the switch, one crossing it while decoding, decoded together, then in a KV
    pool too small for all of them (the scheduler preempts and recomputes). Prefix caching is off: a
    cached block may hold the other factors."""
    model, path, llm = phi3
    assert not llm.engine.block_manager.enable_prefix_caching
    prompts = [_prompt(s, n) for s, n in enumerate((12, 40, 28, 50))]
    refs = [_hf_generate(model, p)[0] for p in prompts]
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == refs
    small = LLM(model=str(path), block_size=BLOCK, max_model_len=64, num_kv_blocks=12, max_num_batched_tokens=24)
    assert [o.outputs[0].token_ids for o in small.generate(prompts, GREEDY, use_tqdm=False)] == refs
    assert small.engine.scheduler.num_preemptions > 0


def test_unsupported_rope_scaling_is_named(tmp_path):
    path = save(build_hf("phi3_longrope"), tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="rope_scaling type 'dynamic' is not supported"):
        LLM(model=str(path), block_size=BLOCK, max_model_len=64, num_kv_blocks=16)
