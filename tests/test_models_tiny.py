"""Tiny random-weight models of every supported family: pagedserve must compute what transformers computes.

Each model is built by transformers from a config, saved with `save_pretrained`
(safetensors) next to a tiny byte-level BPE tokenizer trained here (offline),
then loaded by `LLM(model=dir)`. The logits pagedserve computes at every step
of a greedy generation (a multi-block prompt, prefilled in chunks, then decode
steps) are compared with one HF forward pass over the same tokens.
"""
from __future__ import annotations

import functools
import json
import shutil

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.errors import ConfigError, PagedServeError, UnsupportedModelError

VOCAB = 384
BLOCK = 8
PROMPT_LEN = 45  # 5+ blocks of 8, not a multiple of the block size
NEW_TOKENS = 6


@functools.lru_cache(maxsize=None)
def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>", "<bos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog. " * 4, "hello world 你好 🙂"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>")


def _common(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                rms_norm_eps=1e-5, eos_token_id=0, bos_token_id=1, tie_word_embeddings=False)
    base.update(kw)
    return base


def _configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    return {
        "qwen2": lambda: Qwen2Config(**_common(rope_theta=1e6)),  # q/k/v bias
        "qwen3": lambda: Qwen3Config(**_common(rope_theta=1e6)),  # per-head q/k RMSNorm
        "mistral": lambda: MistralConfig(**_common(sliding_window=None)),
        "llama": lambda: LlamaConfig(**_common(rope_theta=5e5)),
        # Llama 3.1-style RoPE scaling (original context shorter than the prompt) and tied embeddings.
        "llama3_rope_tied": lambda: LlamaConfig(**_common(
            rope_theta=5e5, tie_word_embeddings=True,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 32})),
    }


def _build_hf(name: str):
    from transformers import AutoModelForCausalLM

    cfg = _configs()[name]()
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # HF's 0.02 init gives near-uniform logits (argmax ties); larger weights separate them, and
    # non-unit norm weights make a missing/misplaced norm visible.
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    model.eval()
    return model


def _save(model, path, **kw):
    model.save_pretrained(path, safe_serialization=True, **kw)
    _tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """name -> (hf model, saved dir)."""
    out = {}
    for name in _configs():
        model = _build_hf(name)
        out[name] = (model, _save(model, tmp_path_factory.mktemp(name)))
    return out


def _prompt(seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (PROMPT_LEN,), generator=g).tolist()


class _LogitTap:
    """Wraps the engine's runner to record the logits of every sampling step."""

    def __init__(self, llm):
        self.rows: list[torch.Tensor] = []
        runner = llm.engine.runner
        orig = runner.execute

        def execute(scheduled):
            logits, sampled = orig(scheduled)
            for i, _ in enumerate(sampled):
                self.rows.append(logits[i].clone())
            return logits, sampled

        runner.execute = execute


def _hf_reference(model, prompt: list[int], n_new: int):
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long), eos_token_id=None,
                             pad_token_id=0)
        full = out[0].tolist()
        logits = model(torch.tensor([full])).logits[0]
    return full[len(prompt):], logits[len(prompt) - 1:len(full) - 1]


@pytest.mark.parametrize("name", list(_configs()))
def test_logits_and_greedy_match_hf(tiny_dirs, name):
    model, path = tiny_dirs[name]
    prompt = _prompt()
    ref_tokens, ref_logits = _hf_reference(model, prompt, NEW_TOKENS)

    # A 16-token budget prefills the 45-token prompt in three chunks across block boundaries.
    llm = LLM(model=str(path), block_size=BLOCK, max_model_len=128, num_kv_blocks=64, max_num_batched_tokens=16)
    tap = _LogitTap(llm)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == ref_tokens
    got = torch.stack(tap.rows)
    assert got.shape == ref_logits.shape
    # Logits are O(10) here; fp32 differences in summation order stay far below this.
    torch.testing.assert_close(got, ref_logits.float(), atol=2e-3, rtol=1e-3)

    # Second run: the prompt's full blocks come from the prefix cache; still exact.
    tap.rows.clear()
    out2 = llm.generate([prompt], params, use_tqdm=False)[0]
    assert out2.num_cached_tokens >= (PROMPT_LEN // BLOCK) * BLOCK - BLOCK
    assert out2.outputs[0].token_ids == ref_tokens
    torch.testing.assert_close(torch.stack(tap.rows), ref_logits.float(), atol=2e-3, rtol=1e-3)
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
    path = _save(model, tmp_path / "sharded", max_shard_size="60KB")
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
