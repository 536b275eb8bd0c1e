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


# The `slow` marker, from one rule: a test is slow when it loads a model, starts a server or another
# process, or runs Triton's CPU interpreter. Fixtures that do one of these (a test using one, even
# through another fixture, is slow), then modules whose tests start processes themselves.
# `make test-fast` runs the rest: unit tests built directly from their classes.
SLOW_FIXTURES = frozenset({
    "model_dir", "llm", "hf_model", "tiny_dir", "tiny_dirs", "dirs",  # models
    "server", "cluster", "stack", "real_server", "timed_server", "pool2", "redis_proc",  # servers, processes
    "default_pair", "default_serving", "tool_serving",
    "_interpret",  # Triton's CPU interpreter (tests/triton_interp.py)
})
SLOW_MODULES = frozenset({
    "test_bench_cli", "test_bench_loadgen", "test_bench_workers", "test_cluster_launcher", "test_deploy",
    "test_docker", "test_gc_freeze", "test_hf_parity", "test_models_tiny", "test_peer_harness", "test_runtime",
    "test_shared_prefix_attention", "test_startup_errors", "test_token_budget", "test_fp8", "test_quantization",
    "test_download", "test_gpu", "test_plan", "test_tensor_parallel", "test_offline_bench", "test_server_lifecycle",
})
# Tests in otherwise quick modules that build an engine, start a CLI process or ask the Hub.
SLOW_TESTS = frozenset({
    "test_real_server_answer_cache", "test_serve_cli_checks_before_loading_the_model", "test_router_cli_startup_errors",
    "test_cli_bad_size_is_a_usage_error", "test_cli_flags_reach_the_replicas_and_are_checked_first",
    "test_preemption_keeps_constraint", "test_unknown_model_path", "test_unknown_hub_id_not_cached",
    "test_plots_render_narrow_and_wide_sweeps",
})


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if (module in SLOW_MODULES or getattr(item, "originalname", item.name) in SLOW_TESTS
                or SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ()))):
            item.add_marker(pytest.mark.slow)
