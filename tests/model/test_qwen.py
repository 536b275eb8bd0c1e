"""QWenLMHeadModel against Qwen's original modeling_qwen.py (tests/model/data/qwen_reference.json, made
by tests/model/qwen_reference.py on the tiny checkpoint of tests/model/qwen_tiny.py): logits and greedy
tokens on short prompts, past seq_length (dynamic NTK and logn), under chunked prefill, with the prefix
cache across different alphas, and in one continuous batch."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.errors import ConfigError
from pagedserve.model.hf_config import hf_shape_fields
from pagedserve.model.layers.rotary import ntk_alpha
from tests.model.qwen_tiny import CONFIG, build_qwen_tiny
from tests.tiny_models import LogitTap

REF = json.loads((Path(__file__).parent / "data" / "qwen_reference.json").read_text())
CASES = REF["cases"]
NEW = len(next(iter(CASES.values()))["tokens"])
ENGINE = dict(block_size=16, max_model_len=256, num_kv_blocks=96)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    return build_qwen_tiny(tmp_path_factory.mktemp("qwen-tiny"))


def _run(llm: LLM, names: list[str]) -> dict[str, tuple[list[int], list[torch.Tensor]]]:
    """Greedy outputs and per-step logits of the named cases, submitted together (one continuous batch)."""
    tap = LogitTap(llm.engine)
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": CASES[n]["prompt_ids"]} for n in names], params, use_tqdm=False)
    rows: dict[str, list] = {}
    for rid, _, _, logits in tap.rows:
        rows.setdefault(rid, []).append(logits)
    return {n: (list(o.outputs[0].token_ids), rows[o.request_id]) for n, o in zip(names, outs)}


def _check(name: str, tokens: list[int], logits: list[torch.Tensor]) -> None:
    ref = CASES[name]
    assert tokens == ref["tokens"], name
    assert len(logits) == NEW
    for step, (row, want) in enumerate(zip(logits, ref["steps"])):
        got = row[torch.tensor(want["ids"])]
        torch.testing.assert_close(got, torch.tensor(want["logits"]), atol=2e-4, rtol=1e-4,
                                   msg=lambda m: f"{name} step {step}: {m}")
        assert int(row.argmax()) == want["ids"][0]


def test_reference_has_the_cases_that_matter():
    """The long prompts cover alphas 3, 7 and 15 (the reference ran NTK and logn on them)."""
    s = CONFIG["seq_length"]
    assert {ntk_alpha(len(c["prompt_ids"]), s) for c in CASES.values()} == {1, 3, 7, 15}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_one_request(qwen_dir, name):
    llm = LLM(model=str(qwen_dir), **ENGINE)
    _check(name, *_run(llm, [name])[name])


def test_matches_reference_chunked_prefill_and_continuous_batch(qwen_dir):
    """All cases at once with a 16-token budget: long prompts prefill in chunks (alpha from the whole prompt,
    not the chunk) while short ones decode, so one step mixes RoPE bases and logn factors."""
    llm = LLM(model=str(qwen_dir), max_num_batched_tokens=16, **ENGINE)
    for name, (tokens, logits) in _run(llm, list(CASES)).items():
        _check(name, tokens, logits)


def test_prefix_cache_keeps_alphas_apart(qwen_dir):
    """long40 (alpha 3) and long70 (alpha 7) share 40 prompt tokens but not their K: no cache hit between
    them, and both stay exact. long48 (alpha 3) does reuse long40's blocks."""
    llm = LLM(model=str(qwen_dir), **ENGINE)
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    first = _run(llm, ["long40"])["long40"]
    _check("long40", *first)
    out = llm.generate({"prompt_token_ids": CASES["long70"]["prompt_ids"]}, params, use_tqdm=False)[0]
    assert out.num_cached_tokens == 0
    _check("long70", *_run(llm, ["long70"])["long70"])
    out = llm.generate({"prompt_token_ids": CASES["long48"]["prompt_ids"]}, params, use_tqdm=False)[0]
    assert out.num_cached_tokens == 32
    _check("long48", *_run(llm, ["long48"])["long48"])


def test_padded_vocabulary(qwen_dir):
    """Ids past the tokenizer (151,851..151,935) are never sampled, and a prompt using one is refused."""
    from pagedserve.errors import InvalidRequestError

    llm = LLM(model=str(qwen_dir), **ENGINE)
    logits = llm.engine.model.compute_logits(torch.zeros(1, CONFIG["hidden_size"]))
    assert torch.isinf(logits[0, 151851:]).all() and torch.isfinite(logits[0, :151851]).all()
    with pytest.raises(InvalidRequestError, match="151851"):
        llm.generate({"prompt_token_ids": [1, 2, 151851]}, SamplingParams(max_tokens=1), use_tqdm=False)


def test_v10_config_keys_are_named():
    cfg = {k: v for k, v in CONFIG.items() if k not in ("hidden_size", "num_attention_heads")}
    cfg |= {"n_embd": 64, "n_head": 4}
    with pytest.raises(ConfigError, match="n_embd, n_head") as e:
        hf_shape_fields(cfg)
    assert "hidden_size" in e.value.hint


def test_config_maps_to_the_layer_shapes():
    f = hf_shape_fields(CONFIG)
    assert (f["intermediate_size"], f["head_dim"], f["num_kv_heads"], f["qkv_bias"], f["o_bias"]) == (96, 16, 4, True,
                                                                                                     False)
    assert (f["seq_length"], f["use_dynamic_ntk"], f["use_logn_attn"], f["checkpoint_dtype"]) == (32, True, True,
                                                                                                  "float32")


def test_missing_tiktoken_is_named(qwen_dir, tmp_path):
    import shutil

    d = tmp_path / "no-tok"
    shutil.copytree(qwen_dir, d)
    (d / "qwen.tiktoken").unlink()
    with pytest.raises(ConfigError, match="qwen.tiktoken"):
        LLM(model=str(d), **ENGINE)
