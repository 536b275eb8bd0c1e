"""Read a llama.cpp GGUF file: metadata -> HF config dict, tensors -> HF-named fp32 tensors.

Quantized tensors are dequantized with the `gguf` package. llama.cpp's converter
permutes the Q/K rows of Llama-architecture models (its RoPE pairs adjacent
elements, HF's pairs the two halves); we undo that so the weights match HF.
"""
from __future__ import annotations

import re

import numpy as np
import torch

from pagedserve.errors import ConfigError, UnsupportedModelError

# GGUF architecture -> (HF architecture, HF model_type)
_ARCHS = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if not m or m.group(2) not in _LAYER_NAMES:
        return None
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's convert permute for Q/K projection rows."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def read_gguf(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Return (HF config dict, HF-named float32 tensors) for a GGUF file."""
    try:
        from gguf import GGUFReader
        from gguf.quants import dequantize
    except ImportError as e:  # pragma: no cover - gguf is a dependency
        raise ConfigError("reading GGUF files needs the 'gguf' package", hint="pip install gguf") from e
    try:
        reader = GGUFReader(path)
    except Exception as e:
        raise ConfigError(f"{path} is not a readable GGUF file: {e}") from e
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(_ARCHS))}"
        )
    hf_arch, model_type = _ARCHS[arch]
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    n_kv = int(_field(reader, f"{arch}.attention.head_count_kv", n_head))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    tensors: dict[str, torch.Tensor] = {}
    rope_factors = None
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":  # Llama 3.x RoPE scaling, stored as per-frequency divisors
            rope_factors = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(-1).tolist()
            continue
        name = _hf_name(t.name)
        if name is None:
            continue
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if arch in ("llama", "mistral"):
            if name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.q_proj.bias"):
                w = _unpermute(w, n_head)
            elif name.endswith("self_attn.k_proj.weight") or name.endswith("self_attn.k_proj.bias"):
                w = _unpermute(w, n_kv)
        tensors[name] = torch.from_numpy(w.copy())
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None:
        vocab = tensors["model.embed_tokens.weight"].shape[0]
    head_dim = _field(reader, f"{arch}.attention.key_length") or hidden // n_head
    config = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": int(head_dim),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 4096)),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if model_type == "qwen2" or "model.layers.0.self_attn.q_proj.bias" in tensors:
        config["attention_bias"] = True
    if "model.layers.0.mlp.down_proj.bias" in tensors:
        config["mlp_bias"] = True
    if rope_factors is not None:
        config["rope_freq_factors"] = rope_factors
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(_field(reader, f"{arch}.rope.scaling.factor"))}
    elif scaling not in (None, "none"):
        raise UnsupportedModelError(f"GGUF rope scaling {scaling!r} is not supported (supported: linear, "
                                    "llama3 rope_freqs)")
    return config, tensors
