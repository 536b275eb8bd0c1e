"""The default step token budget follows vLLM's (a user moving over keeps the same step sizes)."""
from __future__ import annotations

import pytest

from pagedserve.config import GiB, EngineConfig, default_token_budget
from tests.tiny_models import build_hf, save


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save(build_hf("llama"), tmp_path_factory.mktemp("tiny_budget"))


@pytest.mark.parametrize("memory_gib, name, serving, want", [
    (141, "NVIDIA H200", False, 16384), (141, "NVIDIA H200", True, 8192),
    (80, "NVIDIA H100 80GB HBM3", False, 16384), (80, "NVIDIA H100 80GB HBM3", True, 8192),
    (80, "NVIDIA A100-SXM4-80GB", False, 8192), (80, "NVIDIA A100-SXM4-80GB", True, 2048),  # A100: vLLM's exception
    (24, "NVIDIA L4", False, 8192), (24, "NVIDIA L4", True, 2048),
    (0, "cpu", False, 2048), (0, "cpu", True, 2048),
])
def test_default_token_budget(memory_gib, name, serving, want):
    assert default_token_budget(int(memory_gib * GiB), name, serving) == want


def test_explicit_budget_wins_and_serving_is_an_option(tiny_dir):
    from pagedserve import LLM

    assert EngineConfig.from_kwargs(serving=True).serving
    cpu = LLM(model=str(tiny_dir), num_kv_blocks=64, max_model_len=128)
    assert cpu.engine.max_num_batched_tokens == 2048  # the CPU default
    assert LLM(model=str(tiny_dir), num_kv_blocks=64, max_model_len=128,
               max_num_batched_tokens=64).engine.max_num_batched_tokens == 64


def test_planner_counts_the_served_budget_of_the_gpu():
    """H100: the served default is 8,192 tokens, so the plan reserves their activations (not 2,048's)."""
    from pagedserve.plan.gpus import find_gpu
    from pagedserve.plan.memory_plan import PlanInput, make_plan
    from pagedserve.plan.model_shapes import activation_bytes, load_shape

    shape = load_shape("Qwen/Qwen2.5-7B-Instruct")
    h100 = find_gpu("H100-80GB")
    auto = make_plan(PlanInput(model=shape, gpu=h100))
    explicit = make_plan(PlanInput(model=shape, gpu=h100, max_num_batched_tokens=8192))
    small = make_plan(PlanInput(model=shape, gpu=h100, max_num_batched_tokens=2048))
    assert auto.overhead_gib == explicit.overhead_gib > small.overhead_gib
    assert activation_bytes(shape, 8192, 2) > activation_bytes(shape, 2048, 2)
