"""Tiny random-weight models of every supported family: pagedserve must compute what transformers computes.

Each model is built by transformers from a config, saved with `save_pretrained`
(safetensors) next to a tiny byte-level BPE tokenizer trained here (offline),
then loaded by `LLM(model=dir)`. The logits pagedserve computes at every step
of a greedy generation (a multi-block prompt, prefilled in chunks, then decode
steps) are compared with one HF forward pass over the same tokens.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.errors import ConfigError, PagedServeError, UnsupportedModelError
from tests.tiny_models import VOCAB, LogitTap, build_hf, configs, save, write_gguf

BLOCK = 8
PROMPT_LEN = 45  # 5+ blocks of 8, not a multiple of the block size
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """name -> (hf model, saved dir)."""
    out = {}
    for name in configs():
        model = build_hf(name)
        out[name] = (model, save(model, tmp_path_factory.mktemp(name)))
    return out


def _prompt(seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (PROMPT_LEN,), generator=g).tolist()


def _hf_reference(model, prompt: list[int], n_new: int):
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long), eos_token_id=None,
                             pad_token_id=0)
        full = out[0].tolist()
        logits = model(torch.tensor([full])).logits[0]
    return full[len(prompt):], logits[len(prompt) - 1:len(full) - 1]


@pytest.mark.parametrize("name", list(configs()))
def test_logits_and_greedy_match_hf(tiny_dirs, name):
    model, path = tiny_dirs[name]
    prompt = _prompt()
    ref_tokens, ref_logits = _hf_reference(model, prompt, NEW_TOKENS)

    # A 16-token budget prefills the 45-token prompt in three chunks across block boundaries.
    llm = LLM(model=str(path), block_size=BLOCK, max_model_len=128, num_kv_blocks=64, max_num_batched_tokens=16)
    tap = LogitTap(llm.engine)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == ref_tokens
    got = torch.stack([r[3] for r in tap.rows])
    assert got.shape == ref_logits.shape
    # Logits are O(10) here; fp32 differences in summation order stay far below this.
    torch.testing.assert_close(got, ref_logits.float(), atol=2e-3, rtol=1e-3)

    # Second run: the prompt's full blocks come from the prefix cache; still exact.
    tap.rows.clear()
    out2 = llm.generate([prompt], params, use_tqdm=False)[0]
    assert out2.num_cached_tokens >= (PROMPT_LEN // BLOCK) * BLOCK - BLOCK
    assert out2.outputs[0].token_ids == ref_tokens
    torch.testing.assert_close(torch.stack([r[3] for r in tap.rows]), ref_logits.float(), atol=2e-3, rtol=1e-3)
    bm = llm.engine.block_manager
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks


def test_batched_prompts_match_hf(tiny_dirs):
    """Several prompts of different lengths in one batch (decodes mixed with prefill chunks)."""
    model, path = tiny_dirs["qwen3"]
    prompts = [_prompt(s)[: 10 + 9 * s] for s in range(4)]
    refs = [_hf_reference(model, p, NEW_TOKENS)[0] for p in prompts]
    llm = LLM(model=str(path), block_size=BLOCK, max_model_len=128, num_kv_blocks=64, max_num_batched_tokens=24)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True),
                        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == refs


def test_sharded_checkpoint_loads(tiny_dirs, tmp_path):
    model, _ = tiny_dirs["qwen2"]
    path = save(model, tmp_path / "sharded", max_shard_size="60KB")
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(shards) > 1 and (path / "model.safetensors.index.json").exists()
    prompt = _prompt()
    ref_tokens, _ = _hf_reference(model, prompt, NEW_TOKENS)
    llm = LLM(model=str(path), block_size=BLOCK, max_model_len=128, num_kv_blocks=32)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True),
                       use_tqdm=False)[0]
    assert out.outputs[0].token_ids == ref_tokens

    # A shard named in the index but absent is named in the error.
    (path / shards[-1]).unlink()
    with pytest.raises(ConfigError, match=shards[-1].replace(".", r"\.")):
        LLM(model=str(path), block_size=BLOCK, max_model_len=128, num_kv_blocks=32)


def test_unknown_architecture_names_supported(tiny_dirs, tmp_path):
    _, src = tiny_dirs["llama"]
    dst = shutil.copytree(src, tmp_path / "gpt")
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError) as ei:
        LLM(model=str(dst), max_model_len=128, num_kv_blocks=32)
    msg = str(ei.value)
    assert "GPTNeoXForCausalLM" in msg
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert arch in msg


@pytest.mark.parametrize("missing, expect", [
    ("config.json", "config.json"),
    ("model.safetensors", "safetensors"),
    ("tokenizer.json", "tokenizer"),
])
def test_missing_files_named(tiny_dirs, tmp_path, missing, expect):
    _, src = tiny_dirs["llama"]
    dst = shutil.copytree(src, tmp_path / "m")
    (dst / missing).unlink()
    with pytest.raises(PagedServeError) as ei:
        LLM(model=str(dst), max_model_len=128, num_kv_blocks=32)
    assert expect in str(ei.value)
    assert str(dst) in str(ei.value)


def test_checkpoint_missing_tensor_named(tiny_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    _, src = tiny_dirs["qwen2"]
    dst = shutil.copytree(src, tmp_path / "m")
    state = load_file(dst / "model.safetensors")
    gone = "model.layers.1.self_attn.k_proj.bias"
    del state[gone]
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match="missing") as ei:
        LLM(model=str(dst), max_model_len=128, num_kv_blocks=32)
    assert "layers.1.self_attn.qkv_proj.bias" in str(ei.value) or "k_proj" in str(ei.value)


# -- GGUF files (llama.cpp layout: permuted Q/K for Llama, rope_freqs for Llama 3 scaling) -------------------------

GGUF_CASES = [("llama", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3"), ("llama3_rope_tied", "llama"),
              ("llama_bias_linear_rope", "llama")]


@pytest.mark.parametrize("name, arch", GGUF_CASES, ids=[n for n, _ in GGUF_CASES])
def test_gguf_file_matches_hf(tiny_dirs, tmp_path, monkeypatch, name, arch):
    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path / "cache"))  # the GGUF -> HF dir conversion lands here
    model, _ = tiny_dirs[name]
    path = tmp_path / f"{name}.gguf"
    write_gguf(model, path, arch)
    prompt = _prompt(3)
    ref_tokens, ref_logits = _hf_reference(model, prompt, NEW_TOKENS)
    llm = LLM(model=str(path), block_size=BLOCK, max_model_len=128, num_kv_blocks=64)
    tap = LogitTap(llm.engine)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True),
                       use_tqdm=False)[0]
    assert out.outputs[0].token_ids == ref_tokens
    torch.testing.assert_close(torch.stack([r[3] for r in tap.rows]), ref_logits.float(), atol=2e-3, rtol=1e-3)
    assert llm.tokenizer.decode(llm.tokenizer.encode("the quick fox")) == "the quick fox"


def test_gguf_unsupported_rope_scaling_is_refused(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path / "cache"))
    model, _ = tiny_dirs["llama"]
    path = tmp_path / "yarn.gguf"
    write_gguf(model, path, "llama", extra_kv={"llama.rope.scaling.type": "yarn"})
    with pytest.raises(UnsupportedModelError, match="yarn"):
        LLM(model=str(path), block_size=BLOCK, max_model_len=128, num_kv_blocks=64)
