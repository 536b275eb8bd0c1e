"""Mixture-of-experts families (Qwen3-MoE, Qwen2-MoE, Mixtral) against transformers' own implementations.

Tiny random models built and saved by transformers (per-expert tensors, as real checkpoints), loaded by
`LLM(model=dir)`: the logits at every step of a greedy generation equal one HF forward pass over the same
tokens, with the prompt prefilled in chunks, in mixed batches and under preemption. On CUDA the experts
run through the fused Triton kernel (tests/model/test_triton_moe.py covers it through the interpreter too).
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.errors import ConfigError, UnsupportedModelError
from pagedserve.model.layers.moe import FusedMoE
from tests.tiny_models import LogitTap, build_hf, hf_greedy, moe_configs, random_prompt, save, tokenizer

BLOCK = 8
PROMPT_LEN = 45
NEW = 6
GREEDY = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    out = {}
    for name in moe_configs():
        model = build_hf(name)
        out[name] = (model, save(model, tmp_path_factory.mktemp(name)))
    return out


def _prompt(seed: int = 0, n: int = PROMPT_LEN) -> list[int]:
    return random_prompt(seed, n)


def _hf(model, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    return hf_greedy(model, prompt, NEW)


@pytest.mark.parametrize("name", list(moe_configs()))
def test_logits_and_greedy_match_hf(dirs, name):
    model, path = dirs[name]
    prompt = _prompt()
    ref_tokens, ref_logits = _hf(model, prompt)
    # A 16-token budget prefills the 45-token prompt in three chunks.
    llm = LLM(model=str(path), block_size=BLOCK, max_model_len=128, num_kv_blocks=64, max_num_batched_tokens=16)
    moe = [m for m in llm.engine.model.modules() if isinstance(m, FusedMoE)]
    assert len(moe) == len(moe_layers(model.config))
    tap = LogitTap(llm.engine)
    out = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == ref_tokens
    torch.testing.assert_close(torch.stack([r[3] for r in tap.rows]), ref_logits.float(), atol=2e-3, rtol=1e-3)


def moe_layers(cfg) -> list[int]:
    """The layers transformers gave experts to (its own rule, read off the built model's config)."""
    if cfg.model_type == "mixtral":
        return list(range(cfg.num_hidden_layers))
    return [i for i in range(cfg.num_hidden_layers) if i not in cfg.mlp_only_layers
            and (i + 1) % cfg.decoder_sparse_step == 0]


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_mixed_batch_and_preemption_match_hf(dirs, name):
    """Prompts of different lengths decoded together with prefill chunks, then a KV pool too small for
    all of them (the scheduler preempts and recomputes): every request's tokens are still HF's."""
    model, path = dirs[name]
    prompts = [_prompt(s, 10 + 9 * s) for s in range(5)]
    refs = [_hf(model, p)[0] for p in prompts]
    llm = LLM(model=str(path), block_size=BLOCK, max_model_len=128, num_kv_blocks=64, max_num_batched_tokens=24)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == refs
    small = LLM(model=str(path), block_size=BLOCK, max_model_len=64, num_kv_blocks=12, max_num_batched_tokens=32)
    assert [o.outputs[0].token_ids for o in small.generate(prompts, GREEDY, use_tqdm=False)] == refs
    assert small.engine.scheduler.num_preemptions > 0


def test_dense_and_sparse_layers_follow_the_config(dirs):
    _, path = dirs["qwen3_moe"]
    llm = LLM(model=str(path), block_size=BLOCK, max_model_len=64, num_kv_blocks=16)
    kinds = [type(layer.mlp).__name__ for layer in llm.engine.model.layers]
    assert kinds == ["MLP", "FusedMoE", "FusedMoE"]
    assert "8 experts" in llm.engine.model.expert_layout() and "top-2 renormalized" in llm.engine.model.expert_layout()
    _, path = dirs["qwen3_moe_step2"]
    llm = LLM(model=str(path), block_size=BLOCK, max_model_len=64, num_kv_blocks=16)
    assert [type(layer.mlp).__name__ for layer in llm.engine.model.layers] == ["MLP", "FusedMoE", "MLP"]


def _edited(src, tmp_path, **changes):
    dst = shutil.copytree(src, tmp_path / "edited")
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_deepseek_routing_and_mla_are_refused_by_name(dirs, tmp_path):
    _, src = dirs["qwen3_moe"]
    dst = _edited(src, tmp_path, architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
                  topk_method="noaux_tc", scoring_func="sigmoid", n_group=8, topk_group=4, kv_lora_rank=512)
    with pytest.raises(UnsupportedModelError) as ei:
        LLM(model=str(dst), max_model_len=64, num_kv_blocks=16)
    msg = str(ei.value)
    for key in ("topk_method='noaux_tc'", "scoring_func='sigmoid'", "n_group=8", "kv_lora_rank=512", "MLA"):
        assert key in msg


def test_int8_refused_before_loading(dirs):
    _, path = dirs["qwen2_moe"]
    with pytest.raises(ConfigError, match="mixture-of-experts") as ei:
        LLM(model=str(path), max_model_len=64, num_kv_blocks=16, quantization="int8")
    assert ei.value.param == "quantization"


TP_KW = dict(max_model_len=128, kv_cache_memory=0.02, max_num_batched_tokens=32, max_num_seqs=8)


@pytest.mark.parametrize("name,load_format", [("qwen2_moe", "auto"), ("mixtral", "auto"), ("qwen3_moe", "dummy")])
def test_tensor_parallel_2_equals_1(dirs, name, load_format):
    """Each rank holds every expert's half of the intermediate dimension (and half the shared expert's):
    TP=2 over gloo on the CPU gives TP=1's tokens, loaded from the checkpoint or as dummy weights (drawn
    full-size and sliced)."""
    _, path = dirs[name]
    prompts = [_prompt(s, 8 + 7 * s) for s in range(3)]
    res = {}
    for tp in (1, 2):
        llm = LLM(model=str(path), tensor_parallel_size=tp, load_format=load_format, **TP_KW)
        try:
            res[tp] = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
        finally:
            if tp > 1:
                llm.engine.tp.executor.shutdown()
    assert res[2] == res[1]


def test_sliding_window_matches_hf(tmp_path):
    """A Mixtral config with a window shorter than the prompt: every layer attends within it, as HF's
    Mixtral does, and --max-model-len may exceed the window."""
    model = build_hf("mixtral")
    model.config.sliding_window = 8  # HF reads it at forward time
    path = save(model, tmp_path / "mixtral_window")
    prompt = _prompt()
    ref_tokens, ref_logits = _hf(model, prompt)
    model.config.sliding_window = None
    _, global_logits = _hf(model, prompt)
    assert (global_logits - ref_logits).abs().max() > 1e-2  # the window matters for this prompt
    llm = LLM(model=str(path), block_size=BLOCK, max_model_len=128, num_kv_blocks=64, max_num_batched_tokens=16)
    assert [layer.self_attn.sliding_window for layer in llm.engine.model.layers] == [8, 8, 8]
    tap = LogitTap(llm.engine)
    out = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == ref_tokens
    torch.testing.assert_close(torch.stack([r[3] for r in tap.rows]), ref_logits.float(), atol=2e-3, rtol=1e-3)


def test_fp8_experts_emulated_on_cpu(dirs, monkeypatch):
    """--quantization fp8 quantizes the stacks per channel (the reference arithmetic off the GPU) and leaves
    the routers dense: each MoE layer stays within fp8's error of HF's block on the same input, and the
    model still generates. (The whole tiny model's logits move ~40% under fp8, experts or not: its dense
    W8A8 layers quantize the activations too.)"""
    monkeypatch.setenv("PAGEDSERVE_FP8_EMULATE", "1")
    model, path = dirs["qwen2_moe"]
    llm = LLM(model=str(path), block_size=BLOCK, max_model_len=64, num_kv_blocks=16, quantization="fp8")
    ours = llm.engine.model.layers
    assert all(isinstance(layer.mlp, FusedMoE) for layer in ours)
    x = torch.randn(17, 64, generator=torch.Generator().manual_seed(5))
    for layer, hf_layer in zip(ours, model.model.layers):
        moe = layer.mlp
        assert moe.w13.dtype == torch.float8_e4m3fn and moe.w2_scale.shape == (6, 64)
        assert moe.gate.weight.dtype == torch.float32 and moe.shared_expert_gate.weight.dtype == torch.float32
        with torch.no_grad():
            want = hf_layer.mlp(x[None])[0]
            got = moe(x)
        assert ((got - want).norm() / want.norm()).item() < 0.08  # e4m3: 3 mantissa bits
    out = llm.generate([_prompt(3, 20)], GREEDY, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == NEW


def test_server_serves_moe_and_names_the_expert_layout(dirs):
    """A real server on a tiny Qwen2-MoE: chat completions through the official client, and /metrics
    carries the expert layout."""
    import httpx
    import openai
    from prometheus_client.parser import text_string_to_metric_families

    from tests.servers import running_server

    model, path = dirs["qwen2_moe"]
    prompt = _prompt(4, 12)
    ref_tokens, _ = _hf(model, prompt)
    with running_server(["--max-model-len", "128", "--kv-cache-memory", "0.05", "--served-model-name", "moe"],
                        model=str(path)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", timeout=300, max_retries=0)
        out = client.completions.create(model="moe", prompt=prompt, max_tokens=NEW, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == NEW
        assert out.choices[0].text == tokenizer().decode(ref_tokens, skip_special_tokens=True)
        text = httpx.get(srv.url + "/metrics", timeout=60).text
    info = [s for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == "pagedserve:expert_layout_info"]
    assert len(info) == 1 and info[0].value == 1
    labels = info[0].labels
    assert (labels["experts"], labels["top_k"], labels["intermediate_size"], labels["sparse_layers"],
            labels["shared_intermediate_size"]) == ("6", "4", "32", "3", "80")
    assert labels["weights"] == "float32"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_gpu_bf16_graphs_equal_eager_and_fp8_experts_run(dirs, name):
    """On the GPU in bf16: the fused kernel inside captured decode graphs gives the eager path's tokens,
    and the prompt's last logits stay within bf16 tolerance of HF's; with --quantization fp8 the stacks
    are e4m3 and the engine generates."""
    model, path = dirs[name]
    prompts = [_prompt(s, 10 + 9 * s) for s in range(4)]
    kw = dict(model=str(path), dtype="bfloat16", max_model_len=128, kv_cache_memory=0.5)
    eager = LLM(enforce_eager=True, **kw)
    graphs = LLM(**kw)
    assert graphs.engine.runner.graphs, "no CUDA graphs were captured"
    a = [o.outputs[0].token_ids for o in eager.generate(prompts, GREEDY, use_tqdm=False)]
    assert a == [o.outputs[0].token_ids for o in graphs.generate(prompts, GREEDY, use_tqdm=False)]
    tap = LogitTap(graphs.engine)
    graphs.generate([prompts[-1]], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    hf = model.to("cuda", torch.bfloat16)
    with torch.inference_mode():
        want = hf(torch.tensor([prompts[-1]], device="cuda")).logits[0, -1].float()
    model.to("cpu", torch.float32)
    got = tap.rows[-1][3].cuda()
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    fp8 = LLM(quantization="fp8", **kw)
    moe = [m for m in fp8.engine.model.modules() if isinstance(m, FusedMoE)]
    assert moe and all(m.w13.dtype == torch.float8_e4m3fn for m in moe)
    assert all(len(o.outputs[0].token_ids) == NEW for o in fp8.generate(prompts, GREEDY, use_tqdm=False))
