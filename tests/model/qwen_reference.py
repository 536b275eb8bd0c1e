"""Make tests/model/data/qwen_reference.json: what Qwen's original modeling_qwen.py computes on the tiny
checkpoint (tests/model/qwen_tiny.py). Run once, in a scratch environment that has Qwen's published
remote-code files as a package (modeling_qwen.py, configuration_qwen.py, tokenization_qwen.py, qwen_generation_utils.py;
not part of this repository) and transformers 4.36, tiktoken and einops:

    QWEN_SRC=/tmp/qwenref/qwen_v1 PYTHONPATH=. /tmp/qwenref/venv/bin/python tests/model/qwen_reference.py

Per prompt: the prompt ids (the reference tokenizer's), 8 greedy tokens and each step's top-10 logits.
Long prompts are prefixes of one text, past seq_length (32) so dynamic NTK (alpha 3, 7, 15) and logn act.
Also Qwen's `make_context` renderings of a few conversations (text and ids).
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

SRC = Path(os.environ.get("QWEN_SRC", "/tmp/qwenref/qwen_v1"))  # a package: modeling_qwen imports relatively
sys.path.insert(0, str(SRC.parent))
QWenConfig = importlib.import_module(f"{SRC.name}.configuration_qwen").QWenConfig
QWenLMHeadModel = importlib.import_module(f"{SRC.name}.modeling_qwen").QWenLMHeadModel
make_context = importlib.import_module(f"{SRC.name}.qwen_generation_utils").make_context
QWenTokenizer = importlib.import_module(f"{SRC.name}.tokenization_qwen").QWenTokenizer

from tests.model.qwen_tiny import CONFIG, build_qwen_tiny, tiny_weights  # noqa: E402

OUT = Path(__file__).parent / "data" / "qwen_reference.json"
NEW_TOKENS, TOP = 8, 10
SHORT = {"english": "The capital of France is", "chinese": "请用一句话介绍一下长城。",
         "code": "def fib(n):\n    return"}
BASE = ("In the beginning the river ran north through the valley, 河水向北流过山谷, and the people built "
        "mills along it 🌊. def turbine(speed): return speed ** 2 * 0.5 # 发电 " * 12)
LONG = {"long40": 40, "long48": 48, "long70": 70, "long140": 140}
CONVERSATIONS = [
    {"query": "你好", "history": [], "system": "You are a helpful assistant."},
    {"query": "And in French?", "history": [["Say hello", "Hello!"], ["再说一遍", "你好！"]],
     "system": "You are a terse translator."},
]


def greedy(model, ids: list[int]) -> dict:
    x = torch.tensor([ids])
    out = model(x, use_cache=True)
    past, steps, tokens = out.past_key_values, [], []
    logits = out.logits[0, -1]
    for _ in range(NEW_TOKENS):
        top = torch.topk(logits.float(), TOP)
        steps.append({"ids": top.indices.tolist(), "logits": top.values.tolist()})
        tok = int(top.indices[0])
        tokens.append(tok)
        out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1]
    return {"prompt_ids": ids, "tokens": tokens, "steps": steps}


def main() -> None:
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as d:
        build_qwen_tiny(Path(d))
        tok = QWenTokenizer(str(Path(d) / "qwen.tiktoken"))
        model = QWenLMHeadModel(QWenConfig(**CONFIG)).float().eval()
        missing, unexpected = model.load_state_dict(tiny_weights(), strict=False)
        assert not unexpected and all("rotary" in m or "logn" in m for m in missing), (missing, unexpected)
        base = tok.encode(BASE)
        prompts = {k: tok.encode(v) for k, v in SHORT.items()} | {k: base[:n] for k, n in LONG.items()}
        cases = {k: greedy(model, ids) | {"text": SHORT.get(k)} for k, ids in prompts.items()}
        chats = []
        for c in CONVERSATIONS:
            text, ids = make_context(tok, c["query"], history=[tuple(h) for h in c["history"]], system=c["system"])
            chats.append(c | {"text": text, "ids": ids})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"config": CONFIG, "cases": cases, "chats": chats}, ensure_ascii=False) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
