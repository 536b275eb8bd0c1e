"""The GPU path (Triton attention, CUDA graphs) against Hugging Face on the same seeded random weights.

Skipped without CUDA; the device runs it with `pytest tests/test_gpu.py`. fp32 must give
HF's greedy tokens exactly and logits within fp32 noise; bf16 must stay within bf16 tolerance.
"""
from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, SamplingParams
from tests.tiny_models import VOCAB, LogitTap, build_hf, configs, save

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPT_LEN = 45
NEW = 8


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    out = {}
    for name in configs():
        model = build_hf(name)
        out[name] = (model, save(model, tmp_path_factory.mktemp(name)))
    return out


def _prompts(k: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(2, VOCAB, (10 + 11 * i,), generator=g).tolist() for i in range(k)]


def _hf(model, prompt, dtype):
    m = model.to("cuda", dtype)
    ids = torch.tensor([prompt], device="cuda")
    with torch.inference_mode():
        out = m.generate(ids, max_new_tokens=NEW, do_sample=False, attention_mask=torch.ones_like(ids),
                         eos_token_id=None, pad_token_id=0)
        full = out[0]
        logits = m(full[None]).logits[0, len(prompt) - 1:-1].float()
    model.to("cpu", torch.float32)
    return full[len(prompt):].tolist(), logits


@pytest.mark.parametrize("name", list(configs()))
def test_fp32_greedy_and_logits_match_hf(dirs, name):
    model, path = dirs[name]
    llm = LLM(model=str(path), dtype="float32", max_model_len=256, max_num_batched_tokens=32, kv_cache_memory=0.5)
    assert llm.engine.device.type == "cuda"
    tap = LogitTap(llm.engine)
    prompts = _prompts(4)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs):
        ref_tokens, ref_logits = _hf(model, p, torch.float32)
        assert o.outputs[0].token_ids == ref_tokens
        got = torch.stack([r[3] for r in tap.rows if r[0] == o.request_id]).cuda()
        torch.testing.assert_close(got, ref_logits, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_bf16_logits_within_tolerance(dirs, name):
    model, path = dirs[name]
    llm = LLM(model=str(path), dtype="bfloat16", max_model_len=256, kv_cache_memory=0.5)
    tap = LogitTap(llm.engine)
    prompt = _prompts(3)[2]
    ref_tokens, ref_logits = _hf(model, prompt, torch.bfloat16)
    # Teacher-force HF's tokens so both score the same sequence even if a near-tie flips an argmax.
    full = prompt + ref_tokens
    out = llm.generate([full], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].token_ids
    got = tap.rows[-1][3].cuda()
    ref_last = _hf(model, full, torch.bfloat16)[1][0]
    scale = ref_last.abs().max()
    assert (got - ref_last).abs().max() < 0.05 * scale


def test_cuda_graph_decode_equals_eager(dirs):
    _, path = dirs["qwen3"]
    prompts = _prompts(5)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    eager = LLM(model=str(path), dtype="float32", max_model_len=256, enforce_eager=True, kv_cache_memory=0.5)
    graphs = LLM(model=str(path), dtype="float32", max_model_len=256, kv_cache_memory=0.5)
    assert graphs.engine.runner.graphs, "no CUDA graphs were captured"
    a = [o.outputs[0].token_ids for o in eager.generate(prompts, params, use_tqdm=False)]
    b = [o.outputs[0].token_ids for o in graphs.generate(prompts, params, use_tqdm=False)]
    assert a == b
    # Sampling with seeds is reproducible across the two paths too.
    sp = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=16, ignore_eos=True)
    assert ([o.outputs[0].token_ids for o in eager.generate(prompts, sp, use_tqdm=False)]
            == [o.outputs[0].token_ids for o in graphs.generate(prompts, sp, use_tqdm=False)])


def test_kv_pool_from_gpu_memory_utilization(dirs):
    """The profiled budget path, with a token budget longer than max_model_len (profiled as several prompts)."""
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    _, path = dirs["llama"]
    llm = LLM(model=str(path), dtype="bfloat16", max_model_len=128, max_num_batched_tokens=1024,
              gpu_memory_utilization=0.3)
    eng = llm.engine
    free, total = torch.cuda.mem_get_info()
    pool = eng.num_kv_blocks * eng.kv_bytes_per_block()
    assert 0.1 * total < pool < 0.3 * total
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


# -- weight quantization (int8, AWQ int4): Triton GEMMs compiled on the GPU --------------------------------------


@pytest.mark.parametrize("m", [1, 16, 200])
def test_quant_kernels_7b_shapes(m):
    """The Triton int8/AWQ GEMMs on 7B-sized matrices (4096 -> 11008) against dequantize + F.linear."""
    from pagedserve.model.awq_format import dequantize, rtn_quantize
    from pagedserve.model.quantization import quantize_int8
    from pagedserve.model.triton_quant import awq_linear_triton, int8_linear_triton

    g = torch.Generator().manual_seed(m)
    n, k = 11008, 4096
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(m, k, generator=g).to("cuda", torch.bfloat16)
    q, s = quantize_int8(w)
    ref = torch.nn.functional.linear(x.float(), (q.float() * s[:, None]).cuda())
    y = int8_linear_triton(x, q.cuda(), s.to("cuda", torch.bfloat16))
    assert ((y.float() - ref).abs().max() / ref.abs().max()).item() < 2e-2
    qw, qz, sc = rtn_quantize(w, 128)
    ref = torch.nn.functional.linear(x.float(), dequantize(qw, qz, sc.bfloat16()).cuda())
    y = awq_linear_triton(x, qw.cuda(), qz.cuda(), sc.to("cuda", torch.bfloat16))
    assert ((y.float() - ref).abs().max() / ref.abs().max()).item() < 2e-2


def test_awq_on_gpu_matches_dequantized_model(dirs, tmp_path):
    """An AWQ checkpoint on the GPU (Triton int4 GEMM, CUDA graphs) vs the same weights dequantized to a
    dense checkpoint: fp32 logits within fp32 noise, greedy tokens equal, graphs equal eager."""
    from pagedserve.bench.quality import prefill_logits
    from pagedserve.model.awq_format import write_awq_checkpoint
    from tests.test_quantization import _dequantized_hf

    model, path = dirs["llama"]
    awq_dir = write_awq_checkpoint(path, tmp_path / "awq", group_size=32)
    deq_dir = save(_dequantized_hf(build_hf("llama"), awq_dir), tmp_path / "deq")
    awq = LLM(model=str(awq_dir), dtype="float32", max_model_len=256, kv_cache_memory=0.5)
    assert awq.engine.runner.graphs
    dense = LLM(model=str(deq_dir), dtype="float32", max_model_len=256, kv_cache_memory=0.5, enforce_eager=True)
    eager = LLM(model=str(awq_dir), dtype="float32", max_model_len=256, kv_cache_memory=0.5, enforce_eager=True)
    prompts = _prompts(4)
    for p in prompts:
        assert (prefill_logits(awq.engine, p) - prefill_logits(dense.engine, p)).abs().max().item() < 2e-3
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    toks = [[o.outputs[0].token_ids for o in e.generate(prompts, params, use_tqdm=False)] for e in (awq, dense, eager)]
    assert toks[0] == toks[1] == toks[2]
    bf = LLM(model=str(awq_dir), dtype="bfloat16", max_model_len=256, kv_cache_memory=0.5)
    p = prompts[0]
    ref = prefill_logits(dense.engine, p)
    assert ((prefill_logits(bf.engine, p) - ref).abs().max() / ref.abs().max()).item() < 5e-2


def test_int8_on_gpu_matches_cpu_int8(dirs):
    """int8 quantizes on the host in both cases, so GPU fp32 logits must equal the CPU int8 engine's."""
    from pagedserve.bench.quality import prefill_logits
    from pagedserve.model.quantization import Int8Linear

    _, path = dirs["qwen2"]
    gpu = LLM(model=str(path), dtype="float32", max_model_len=256, kv_cache_memory=0.5, quantization="int8")
    cpu = LLM(model=str(path), device="cpu", max_model_len=256, kv_cache_memory=0.05, quantization="int8")
    assert any(isinstance(m, Int8Linear) and m.weight.is_cuda for m in gpu.engine.model.modules())
    for p in _prompts(3):
        a, b = prefill_logits(gpu.engine, p).cpu(), prefill_logits(cpu.engine, p)
        assert (a - b).abs().max().item() < 2e-3
