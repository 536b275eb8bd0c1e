"""Shared fixtures: the default model (converted once), Hugging Face references, small engines."""
from __future__ import annotations

import functools

import pytest
import torch

torch.set_num_threads(2)

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "List three prime numbers:",
    # Prompts that share a long prefix exercise the prefix cache (several full blocks).
    "You are a careful assistant. Answer briefly and precisely, using plain words. "
    "Question: what colour is the sky on a clear day? Answer:",
    "You are a careful assistant. Answer briefly and precisely, using plain words. "
    "Question: how many legs does a spider have? Answer:",
    "def fibonacci(n):\n    ",
    "In 1969, the first humans to walk on the Moon were",
    "Translate to French: 'Good morning, my friend.' ->",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old clockmaker who",
    "1, 2, 3, 4,",
]
MAX_TOKENS = 24


@pytest.fixture(scope="session")
def model_dir():
    from pagedserve.model.default_model import default_model_dir

    return default_model_dir()


@functools.lru_cache(maxsize=None)
def _hf_model(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def hf_model(model_dir):
    return _hf_model(str(model_dir))


@pytest.fixture(scope="session")
def hf_greedy(hf_model):
    """HF greedy continuations, one prompt at a time (no padding), as token id lists."""
    model, tok = hf_model
    refs = []
    with torch.inference_mode():
        for p in PROMPTS:
            ids = tok(p, return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, attention_mask=torch.ones_like(ids))
            refs.append(out[0, ids.shape[1]:].tolist())
    return refs


@pytest.fixture(scope="session")
def llm():
    """A shared small engine on the default model for tests that do not need special settings."""
    from pagedserve import LLM

    return LLM(max_model_len=512, kv_cache_memory=0.25, max_num_seqs=32)
