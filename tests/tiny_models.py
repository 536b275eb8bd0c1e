"""Tiny random-weight Llama-family checkpoints built with transformers, for fast engine tests.

`tiny_model_dir(path)` writes a 2-layer, hidden-64 model (vocab 384) and a tiny
byte-level BPE tokenizer trained on the spot (no network) into `path`.
"""
from __future__ import annotations

import functools
import json
import math
from collections import Counter

import numpy as np
import torch

VOCAB = 384


@functools.lru_cache(maxsize=None)
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>", "<bos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog. " * 4, "hello world 你好 🙂"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>")


def common(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                rms_norm_eps=1e-5, eos_token_id=0, bos_token_id=1, tie_word_embeddings=False)
    base.update(kw)
    return base


def configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    return {
        "qwen2": lambda: Qwen2Config(**common(rope_theta=1e6)),  # q/k/v bias
        # Per-head q/k RMSNorm; head_dim 32 != hidden / heads, as in real Qwen3 checkpoints.
        "qwen3": lambda: Qwen3Config(**common(rope_theta=1e6, head_dim=32)),
        "mistral": lambda: MistralConfig(**common(sliding_window=None, num_key_value_heads=1)),  # MQA
        "llama": lambda: LlamaConfig(**common(rope_theta=5e5)),
        "llama_bias_linear_rope": lambda: LlamaConfig(**common(  # attention_bias (q/k/v/o), mlp_bias, linear RoPE
            attention_bias=True, mlp_bias=True, rope_scaling={"rope_type": "linear", "factor": 2.0})),
        # Llama 3.1-style RoPE scaling (original context shorter than the prompt) and tied embeddings.
        "llama3_rope_tied": lambda: LlamaConfig(**common(
            rope_theta=5e5, tie_word_embeddings=True,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 32})),
    }


def moe_configs():
    """Mixture-of-experts families: expert sizes multiples of 16 (the fused kernel's K steps), some idle experts."""
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    moe = dict(num_hidden_layers=3, head_dim=32)
    return {
        # layer 0 dense (mlp_only_layers), top-2 of 8 renormalized, q/k norms
        "qwen3_moe": lambda: Qwen3MoeConfig(**common(**moe, rope_theta=1e6, num_experts=8, num_experts_per_tok=2,
                                                     moe_intermediate_size=32, norm_topk_prob=True,
                                                     mlp_only_layers=[0])),
        # decoder_sparse_step 2: only layer 1 has experts; top-3 of 6, not renormalized
        "qwen3_moe_step2": lambda: Qwen3MoeConfig(**common(**moe, rope_theta=1e6, num_experts=6,
                                                           num_experts_per_tok=3, moe_intermediate_size=48,
                                                           norm_topk_prob=False, decoder_sparse_step=2)),
        # q/k/v bias, top-4 of 6 without renormalization, a sigmoid-gated shared expert
        "qwen2_moe": lambda: Qwen2MoeConfig(**common(**moe, rope_theta=1e6, num_experts=6, num_experts_per_tok=4,
                                                     moe_intermediate_size=32, shared_expert_intermediate_size=80,
                                                     norm_topk_prob=False)),
        "mixtral": lambda: MixtralConfig(**common(**moe, intermediate_size=48, num_local_experts=4,
                                                  num_experts_per_tok=2, sliding_window=None, rope_theta=1e6)),
    }


def window_configs():
    """Sliding-window and soft-capped families: windows shorter than the test prompts."""
    from transformers import Gemma2Config

    return {
        # layers 0 and 2 local (window 8), 1 and 3 global; caps low enough to bite on these weights
        "gemma2": lambda: Gemma2Config(**common(num_hidden_layers=4, sliding_window=8, query_pre_attn_scalar=24,
                                                attn_logit_softcapping=4.0, final_logit_softcapping=5.0,
                                                tie_word_embeddings=True, rope_theta=1e4,
                                                attn_implementation="eager")),
    }


def family_configs():
    """Families with their own model file (issue 35): Phi-3 with LongRoPE switching at 32 tokens; Gemma 3
    with 2 local layers (window 8) to each global one, distinct local/global RoPE bases, linear scaling;
    GLM-4 (0414) with partial rotary."""
    from transformers import Gemma3TextConfig, Glm4Config, Phi3Config

    ramp = [1.0 + 0.5 * i for i in range(8)]  # head_dim 16: 8 factors per set
    return {
        "phi3_longrope": lambda: Phi3Config(**common(
            num_hidden_layers=3, pad_token_id=0, original_max_position_embeddings=32,
            rope_scaling={"type": "longrope", "short_factor": [1.0] * 4 + [1.5] * 4, "long_factor": ramp})),
        "gemma3": lambda: Gemma3TextConfig(**common(
            num_hidden_layers=5, sliding_window=8, sliding_window_pattern=3, query_pre_attn_scalar=24,
            rope_theta=1e6, rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
            tie_word_embeddings=True, attn_implementation="eager")),
        # rotary on half of each head (interleaved pairs), q/k/v bias, post-sublayer norms
        "glm4": lambda: Glm4Config(**common(num_hidden_layers=3, partial_rotary_factor=0.5, attention_bias=True,
                                            pad_token_id=0)),
    }


def build_hf(name: str):
    from transformers import AutoModelForCausalLM

    cfg = {**configs(), **moe_configs(), **window_configs(), **family_configs()}[name]()
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


def save(model, path, **kw):
    model.save_pretrained(path, safe_serialization=True, **kw)
    tokenizer().save_pretrained(path)
    return path


def tiny_model_dir(path, name: str = "llama"):
    """Build, save and return `path` holding the tiny `name` model and its tokenizer."""
    return save(build_hf(name), path)


def random_prompt(seed: int = 0, n: int = 45) -> list[int]:
    """n token ids in [2, VOCAB), the same for the same seed."""
    return torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_greedy(model, prompt: list[int], new: int) -> tuple[list[int], torch.Tensor]:
    """HF's greedy continuation of `prompt` (`new` tokens, no EOS) and, from one forward over the whole
    sequence, the logits that chose each of them."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long), pad_token_id=0)
        full = out[0].tolist()
        logits = model(torch.tensor([full])).logits[0]
    return full[len(prompt):], logits[len(prompt) - 1:len(full) - 1]


class LogitTap:
    """Wraps an engine's runner to record, for every sampled row, (request id, output index, position, logits)."""

    def __init__(self, engine):
        self.rows: list[tuple[str, int, int, torch.Tensor]] = []
        orig = engine._execute

        def execute(scheduled, *rest):
            logits, sampled = orig(scheduled, *rest)  # the step's tokens are computed: num_computed moved past them
            for i, e in enumerate(sampled):
                pos = e.seq.num_computed + e.num_spec - 1
                self.rows.append((e.request.request_id, e.seq.index, pos, logits[i].clone()))
            return logits, sampled

        engine._execute = execute


def check_blocks(bm, seqs) -> None:
    """Refcount of every block == number of block tables holding it; free list == blocks with refcount 0."""
    bm.check_invariants()
    refs = Counter(b for s in seqs for b in s.block_table)
    for s in seqs:
        assert len(set(s.block_table)) == len(s.block_table), "a block appears twice in one table"
    for b in bm.blocks:
        assert b.ref_count == refs[b.block_id], f"block {b.block_id}: refcount {b.ref_count} != {refs[b.block_id]}"
    assert bm.num_free_blocks == bm.num_blocks - len(refs)
    for bid in bm.cached.values():  # a cached block holds a full, hashed block
        assert bm.blocks[bid].hash is not None


def check_engine(engine) -> None:
    """Every block's refcount equals the block tables holding it; waiting requests hold nothing."""
    s = engine.scheduler
    seqs = [q for r in s.running + list(s.waiting) for q in r.seqs if not q.finished]
    check_blocks(engine.block_manager, seqs)
    for r in s.waiting:
        assert all(not q.block_table for q in r.seqs), "a waiting request holds blocks"
    for r in s.running + list(s.waiting):
        assert engine.requests.get(r.request_id) is r
    assert len(engine.requests) == len(s.running) + len(s.waiting)


# -- GGUF (llama.cpp layout) ---------------------------------------------------------------------------------


def _permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf Q/K row permutation (Llama architecture)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_factors(cfg):
    """The rope_freqs tensor llama.cpp writes for rope_type llama3."""
    rp = cfg.rope_parameters
    base, dim, factor = rp["rope_theta"], cfg.head_dim, rp["factor"]
    low, high = rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old = rp["original_max_position_embeddings"]
    lw, hw = old / low, old / high
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    out = []
    for f in freqs.tolist():
        wl = 2 * math.pi / f
        if wl < hw:
            out.append(1.0)
        elif wl > lw:
            out.append(factor)
        else:
            s = (old / wl - low) / (high - low)
            out.append(1 / ((1 - s) / factor + s))
    return np.array(out, dtype=np.float32)


def write_gguf(model, path, arch: str, extra_kv=None):
    """Write an HF model as an F32 GGUF file the way llama.cpp's converter lays it out."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    rp = cfg.rope_parameters
    if rp.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rp["factor"])
    tj = json.loads(tokenizer().backend_tokenizer.to_str())
    vocab = tj["model"]["vocab"]
    toks = [None] * len(vocab)
    for t, i in vocab.items():
        toks[i] = t
    specials = {a["id"] for a in tj["added_tokens"]}
    toks = toks + [f"<pad{i}>" for i in range(cfg.vocab_size - len(toks))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(toks)
    w.add_token_types([3 if i in specials else 1 for i in range(len(toks))])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for k, v in sd.items():
        if k == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif k == "model.norm.weight":
            name = "output_norm.weight"
        elif k == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            name = "output.weight"
        else:
            parts = k.split(".")
            layer, mod, kind = parts[2], ".".join(parts[3:-1]), parts[-1]
            name = f"blk.{layer}.{names[mod]}.{kind}"
            if arch == "llama" and mod == "self_attn.q_proj":
                v = _permute(v, cfg.num_attention_heads)
            if arch == "llama" and mod == "self_attn.k_proj":
                v = _permute(v, cfg.num_key_value_heads)
        w.add_tensor(name, np.ascontiguousarray(v))
    if rp.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_factors(cfg))
    for key, val in (extra_kv or {}).items():
        w.add_string(key, val)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
