"""Memory planner: numbers for known configs checked against hand arithmetic."""
import json

import pytest

from pagedserve.cli import main
from pagedserve.errors import ConfigError
from pagedserve.plan import GPUS, GiB, KNOWN_MODELS, ModelShape, PlanInput, load_shape, make_plan


def _params(vocab, hidden, inter, layers, heads, kv_heads, tied, bias):
    hd = hidden // heads
    per_layer = hidden * (heads * hd + 2 * kv_heads * hd) + heads * hd * hidden + 3 * hidden * inter
    per_layer += 2 * hidden + ((heads + 2 * kv_heads) * hd if bias else 0)
    return vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden


def test_qwen7b_on_v100_does_not_fit_50_concurrent():
    shape = load_shape("Qwen/Qwen-7B")
    n = _params(151936, 4096, 11008, 32, 32, 32, tied=False, bias=True)
    assert shape.num_params() == n  # ~7.72 B
    assert 7.7e9 < n < 7.75e9
    # KV per token: K and V x 32 layers x 32 heads x 128 dims x 2 bytes (fp16) = 512 KiB.
    assert shape.kv_bytes_per_token(2) == 2 * 32 * 32 * 128 * 2 == 512 * 1024
    v100 = GPUS["v100-16gb"]
    plan = make_plan(PlanInput(shape, v100, max_model_len=2048, concurrency=50))
    assert plan.dtype == "float16"  # V100 (sm70) has no bf16: the planner falls back and says so
    assert any("bfloat16" in w for w in plan.warnings)
    assert plan.weights_gib == pytest.approx(n * 2 / GiB, rel=1e-6)  # 14.4 GiB
    assert plan.budget_gib == pytest.approx(16160 / 1024 * 0.9)  # 14.2 GiB
    assert not plan.fits and "does not load" in plan.verdict
    assert any("--quantization int8" in f for f in plan.fixes)
    assert any("--tensor-parallel-size 2" in f for f in plan.fixes)

    # Quantized to int8 it loads, but 50 x 2048 tokens x 0.5 MiB = 50 GiB of KV does not fit.
    q = make_plan(PlanInput(shape, v100, quantization="int8", max_model_len=2048, concurrency=50))
    assert q.kv_gib_per_sequence == pytest.approx(1.0)
    pool = 16160 / 1024 * 0.9 * GiB - q.weights_gib * GiB - q.overhead_gib * GiB
    assert q.num_blocks == int(pool // (512 * 1024 * 16))
    assert q.max_concurrency == q.num_blocks // 128 < 50
    assert not q.fits and "50 concurrent sequences" in q.verdict and "50.0 GiB" in q.verdict
    assert any("--max-model-len" in f for f in q.fixes)


def test_llama3_8b_on_a100_40gb():
    shape = load_shape("meta-llama/Meta-Llama-3-8B-Instruct")
    n = _params(128256, 4096, 14336, 32, 32, 8, tied=False, bias=False)
    assert shape.num_params() == n  # 8.03 B
    assert shape.kv_bytes_per_token(2) == 2 * 32 * 8 * 128 * 2  # 128 KiB: GQA shrinks KV 4x
    plan = make_plan(PlanInput(shape, GPUS["a100-40gb"], max_model_len=8192, concurrency=16))
    assert plan.dtype == "bfloat16"
    assert plan.weights_gib == pytest.approx(n * 2 / GiB, rel=1e-6)
    expected_pool = 40 * 0.9 - n * 2 / GiB - plan.overhead_gib
    assert plan.kv_pool_gib == pytest.approx(expected_pool, abs=1e-6)
    assert plan.max_concurrency == int(expected_pool * GiB // (128 * 1024 * 16)) // 512
    assert plan.fits and plan.max_concurrency >= 16
    # TP=2 halves the weights per GPU and the KV heads per rank.
    tp = make_plan(PlanInput(shape, GPUS["a100-40gb"], max_model_len=8192, tensor_parallel_size=2))
    assert tp.weights_gib == pytest.approx(plan.weights_gib / 2, rel=1e-6)
    assert tp.kv_bytes_per_token == plan.kv_bytes_per_token // 2


def test_qwen25_05b_on_h100_and_replicas():
    shape = load_shape("Qwen2.5-0.5B-Instruct")
    n = _params(151936, 896, 4864, 24, 14, 2, tied=True, bias=True)
    assert shape.num_params() == n  # ~0.49 B
    assert shape.kv_bytes_per_token(2) == 2 * 24 * 2 * 64 * 2  # 12 KiB
    plan = make_plan(PlanInput(shape, GPUS["h100-80gb"], max_model_len=4096, concurrency=2000, replicas=2))
    per_seq_blocks = 4096 // 16
    assert plan.max_concurrency == plan.num_blocks // per_seq_blocks
    assert plan.cluster_concurrency == 2 * plan.max_concurrency
    assert plan.gpus_needed == 2
    assert plan.fits == (plan.cluster_concurrency >= 2000)


def test_engine_block_count_on_cpu_agrees_with_planner(llm):
    # The session engine: max_model_len=512, kv_cache_memory=0.25 GiB, fp32 on CPU.
    eng = llm.engine
    plan = make_plan(PlanInput(ModelShape.from_config(eng.hf_config), None, kv_cache_memory=0.25,
                               max_model_len=512))
    assert plan.kv_bytes_per_token * 16 == eng.kv_bytes_per_block()
    assert abs(plan.num_blocks - eng.num_kv_blocks) <= 0.05 * eng.num_kv_blocks
    assert plan.max_concurrency == eng.num_kv_blocks // (512 // 16)


def test_cli_json_and_exit_codes(capsys):
    assert main(["plan", "Qwen/Qwen-7B", "--gpu", "V100-16GB", "--concurrency", "50", "--max-model-len",
                 "2048", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is False and data["kv_bytes_per_token"] == 512 * 1024
    assert main(["plan", "Qwen2.5-0.5B-Instruct", "--gpu-memory", "24", "--max-model-len", "2048"]) == 0
    out = capsys.readouterr().out
    assert "KV per token" in out and "OK" in out
    assert main(["plan", "no/such-model-anywhere", "--gpu", "A100-80GB"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "known presets" in err and "Traceback" not in err
    assert main(["plan", "Qwen/Qwen-7B", "--gpu", "B9000"]) == 1
    assert "unknown GPU" in capsys.readouterr().err


def test_bad_tensor_parallel_size():
    shape = load_shape("Qwen/Qwen-7B")
    if shape.num_kv_heads >= 3:  # split unevenly by KV-head groups, as the engine does
        assert make_plan(PlanInput(shape, GPUS["a100-80gb"], tensor_parallel_size=3)).tensor_parallel_size == 3
    with pytest.raises(ConfigError, match="cannot split this model"):
        make_plan(PlanInput(shape, GPUS["a100-80gb"], tensor_parallel_size=shape.num_heads + 1))


def test_presets_are_consistent():
    for name, cfg in KNOWN_MODELS.items():
        shape = ModelShape.from_config(cfg, name)
        assert shape.num_heads % shape.num_kv_heads == 0
        assert 0.4e9 < shape.num_params() < 9e9


def test_startup_memory_check_refuses_before_allocating():
    from pagedserve.errors import OutOfMemoryError
    from pagedserve.plan import available_host_memory, check_memory_before_load

    qwen = load_shape("Qwen/Qwen-7B")
    with pytest.raises(OutOfMemoryError, match=r"weights need 14\.4 GiB .* budget is 14\.2 GiB"):
        check_memory_before_load(qwen, 2, None, "cuda", None, int(16160 / 1024 * GiB), 0.9)
    check_memory_before_load(qwen, 2, "int8", "cuda", None, int(16160 / 1024 * GiB), 0.9)  # int8 loads
    small = load_shape("Qwen2.5-0.5B-Instruct")
    absurd = available_host_memory() + 64 * GiB
    with pytest.raises(OutOfMemoryError, match="KV cache .* only .* GiB of memory is available"):
        check_memory_before_load(small, 4, None, "cpu", absurd)
    check_memory_before_load(small, 4, None, "cpu", GiB // 4)


def test_planner_and_model_read_config_json_the_same_way():
    """One reader (model/hf_config.py) serves both; a config missing a size is a ConfigError, not a KeyError."""
    from pagedserve.model.model_args import ModelArgs

    cfg = dict(KNOWN_MODELS["Qwen/Qwen2.5-0.5B-Instruct"], head_dim=96, model_type="qwen2")
    shape, args = ModelShape.from_config(cfg), ModelArgs.from_hf(cfg)
    for f in ("num_heads", "num_kv_heads", "head_dim", "num_layers", "qkv_bias", "tie_word_embeddings"):
        assert getattr(shape, f) == getattr(args, f), f
    assert shape.head_dim == 96 and shape.qkv_bias
    bad = {k: v for k, v in cfg.items() if k != "num_attention_heads"}
    for read in (ModelShape.from_config, ModelArgs.from_hf):
        with pytest.raises(ConfigError, match="num_attention_heads"):
            read(bad)
