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


def test_overlapped_step_equals_synchronous(dirs):
    """Issue 18: the overlapped step (default on one GPU) gives the synchronous step's tokens."""
    _, path = dirs["qwen3"]
    llm = LLM(model=str(path), dtype="float32", max_model_len=256, kv_cache_memory=0.5)
    assert llm.engine.async_scheduling
    prompts = _prompts(6)
    greedy = [SamplingParams(temperature=0, max_tokens=2 + 7 * i, ignore_eos=i % 2 == 0) for i in range(6)]
    seeded = [SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=20, ignore_eos=True) for i in range(6)]
    runs = []
    for on in (True, False):
        llm.engine.async_scheduling = on
        runs.append([[o.outputs[0].token_ids for o in llm.generate(prompts, ps, use_tqdm=False)]
                     for ps in (greedy, seeded)])
    assert runs[0] == runs[1]


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


def test_int8_on_gpu_matches_cpu_int8(dirs, monkeypatch):
    """int8 quantizes on the host in both cases, so GPU fp32 logits must equal the CPU int8 engine's
    (weight-only on both: W8A8 is kept off here; test_int8_w8a8_engine covers it)."""
    from pagedserve.bench.quality import prefill_logits
    from pagedserve.model.quantization import Int8Linear

    monkeypatch.setenv("PAGEDSERVE_INT8_W8A8_FROM_M", str(1 << 30))

    _, path = dirs["qwen2"]
    gpu = LLM(model=str(path), dtype="float32", max_model_len=256, kv_cache_memory=0.5, quantization="int8")
    cpu = LLM(model=str(path), device="cpu", max_model_len=256, kv_cache_memory=0.05, quantization="int8")
    assert any(isinstance(m, Int8Linear) and m.weight.is_cuda for m in gpu.engine.model.modules())
    for p in _prompts(3):
        a, b = prefill_logits(gpu.engine, p).cpu(), prefill_logits(cpu.engine, p)
        assert (a - b).abs().max().item() < 2e-3


# -- FP8 (Ada/Hopper): weight-only Triton / _scaled_mm, fp8 KV cache; large-M paths of int8/AWQ ------------
needs_fp8 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                               reason="needs compute capability >= 8.9")


@needs_fp8
@pytest.mark.parametrize("m", [1, 16, 300])
def test_fp8_gemm_7b_shapes(m):
    """Per-token quant kernel + torch._scaled_mm, and the weight-only Triton kernel, on 7B-sized matrices vs
    the same arithmetic in fp32."""
    from pagedserve.model.fp8 import (fp8_linear, fp8_linear_cuda, fp8_linear_reference,
                                      fp8_linear_weight_only_reference, per_token_quant, quantize_fp8_rows)
    from pagedserve.model.quant_dispatch import FP8_TRITON_MAX_M
    from pagedserve.model.triton_quant import fp8_linear_triton

    g = torch.Generator().manual_seed(m)
    for n, k in ((11008, 4096), (4096, 11008)):
        w = (torch.randn(n, k, generator=g) * 0.02).cuda()
        x = torch.randn(m, k, generator=g).to("cuda", torch.bfloat16)
        qw, sw = quantize_fp8_rows(w)
        qx, sx = per_token_quant(x)
        rqx, rsx = quantize_fp8_rows(x)
        assert torch.equal(qx.view(torch.uint8), rqx.view(torch.uint8)) and torch.allclose(sx.squeeze(1), rsx)
        y = fp8_linear_cuda(x, qw, sw)
        ref = fp8_linear_reference(x.float(), qw, sw)
        assert y.dtype == torch.bfloat16
        assert ((y.float() - ref).abs().max() / ref.abs().max()).item() < 1e-2
        dense = torch.nn.functional.linear(x.float(), w)
        assert ((y.float() - dense).norm() / dense.norm()).item() < 0.06  # fp8 error of W and x
        # The small-M weight-only path (W8A16 Triton kernel): x times the exactly dequantized weight.
        yw = fp8_linear_triton(x, qw, sw)
        ref_w = fp8_linear_weight_only_reference(x.float(), qw, sw)
        assert yw.dtype == torch.bfloat16
        assert ((yw.float() - ref_w).abs().max() / ref_w.abs().max()).item() < 1e-2
        assert ((yw.float() - dense).norm() / dense.norm()).item() < 0.05  # fp8 error of W only
        picked = fp8_linear(x, qw, sw)  # the dispatch: Triton below FP8_TRITON_MAX_M rows, _scaled_mm above
        assert torch.equal(picked, yw if m < FP8_TRITON_MAX_M else y)


@pytest.mark.parametrize("m", [17, 256, 600])
def test_quant_large_m_paths_7b_shapes(m):
    """Large M: int8 W8A8 (per-token int8 quant kernel + torch._int_mm + epilogue kernel) against the same
    arithmetic in torch, and within activation-quantization error of the weight-only product; AWQ through
    dequantize + cuBLAS."""
    from pagedserve.model.awq_format import dequantize, rtn_quantize
    from pagedserve.model.int8_w8a8 import int8_w8a8_linear, int8_w8a8_reference, per_token_quant_int8
    from pagedserve.model.int8_w8a8 import quantize_int8_rows_rne_away
    from pagedserve.model.quantization import quantize_int8
    from pagedserve.model.triton_quant import awq_linear_dense

    g = torch.Generator().manual_seed(m)
    for n, k in ((11008, 4096), (4096, 11008)):
        w = torch.randn(n, k, generator=g) * 0.02
        x = torch.randn(m, k, generator=g).to("cuda", torch.bfloat16)
        q, s = quantize_int8(w)
        qc, sc8 = q.cuda(), s.to("cuda", torch.bfloat16)
        qx, sx = per_token_quant_int8(x)
        rqx, rsx = quantize_int8_rows_rne_away(x)
        assert torch.allclose(sx, rsx, rtol=1e-6, atol=0)
        assert (qx.int() - rqx.int()).abs().max().item() <= 1  # x / s in Triton may differ by an ulp at a tie
        y = int8_w8a8_linear(x, qc, sc8)
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        ref = int8_w8a8_reference(x.float(), qc, sc8)
        assert ((y.float() - ref).abs().max() / ref.abs().max()).item() < 1e-2
        weight_only = torch.nn.functional.linear(x.float(), qc.float() * sc8.float()[:, None])
        assert ((y.float() - weight_only).norm() / weight_only.norm()).item() < 0.03  # activation rounding
    n, k = 11008, 4096
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(m, k, generator=g).to("cuda", torch.bfloat16)
    qw, qz, sc = rtn_quantize(w, 128)
    ref = torch.nn.functional.linear(x.float(), dequantize(qw, qz, sc.bfloat16()).cuda())
    y = awq_linear_dense(x, qw.cuda(), qz.cuda(), sc.to("cuda", torch.bfloat16))
    assert ((y.float() - ref).abs().max() / ref.abs().max()).item() < 2e-2


def test_int8_w8a8_engine(dirs, monkeypatch):
    """The int8 engine with W8A8 from 17 rows (so the tiny model's prefills take it): logits near the
    weight-only CPU engine (activation rounding only), CUDA graphs equal eager."""
    from pagedserve.bench.quality import prefill_logits

    monkeypatch.setenv("PAGEDSERVE_INT8_W8A8_FROM_M", "17")
    _, path = dirs["qwen2"]
    # fp32 model: the activation rounding is the only difference from the CPU engine, and graph replays
    # (padded batches, other split-K tilings) cannot flip a near-tie through bf16 rounding.
    gpu = LLM(model=str(path), dtype="float32", max_model_len=256, kv_cache_memory=0.5, quantization="int8")
    cpu = LLM(model=str(path), device="cpu", max_model_len=256, kv_cache_memory=0.05, quantization="int8")
    for p in _prompts(3)[1:]:  # 21 and 32 tokens
        a, b = prefill_logits(gpu.engine, p).cpu(), prefill_logits(cpu.engine, p)
        assert 0 < ((a - b).norm() / b.norm()).item() < 0.05  # > 0: the W8A8 path really ran
    eager = LLM(model=str(path), dtype="float32", max_model_len=256, kv_cache_memory=0.5, quantization="int8",
                enforce_eager=True)
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    toks = [[o.outputs[0].token_ids for o in e.generate(_prompts(4), params, use_tqdm=False)] for e in (gpu, eager)]
    assert toks[0] == toks[1]


@needs_fp8
def test_fp8_engine_matches_cpu_emulation_and_checkpoints(dirs, tmp_path, monkeypatch):
    """--quantization fp8 on the GPU vs the CPU's emulated fp8 engine, both paths, each forced with
    PAGEDSERVE_FP8_TRITON_MAX_M (read at every call, by both engines): the weight-only Triton kernel (fp32
    model, so fp32 noise only) and W8A8 `_scaled_mm`. The per-channel fp8 checkpoint of the same model gives the
    very same weights, so the same logits; the per-tensor one stays close; CUDA graphs equal eager."""
    from pagedserve.bench.quality import prefill_logits
    from pagedserve.model.fp8_format import write_fp8_checkpoint

    monkeypatch.setenv("PAGEDSERVE_FP8_EMULATE", "1")
    _, path = dirs["qwen2"]  # q/k/v biases
    kw = dict(max_model_len=256, kv_cache_memory=0.5)
    gpu = LLM(model=str(path), dtype="float32", quantization="fp8", **kw)
    cpu = LLM(model=str(path), device="cpu", dtype="float32", quantization="fp8", max_model_len=256,
              kv_cache_memory=0.05)
    chan = LLM(model=str(write_fp8_checkpoint(path, tmp_path / "c", scheme="channel")), dtype="float32", **kw)
    tens = LLM(model=str(write_fp8_checkpoint(path, tmp_path / "t", scheme="tensor")), dtype="float32", **kw)
    eager = LLM(model=str(path), dtype="float32", quantization="fp8", enforce_eager=True, **kw)
    assert chan.engine.quantization == tens.engine.quantization == "fp8"
    monkeypatch.setenv("PAGEDSERVE_FP8_TRITON_MAX_M", str(1 << 30))  # every prefill weight-only (Triton)
    for p in _prompts(3):
        a, b = prefill_logits(gpu.engine, p), prefill_logits(cpu.engine, p).cuda()
        assert ((a - b).norm() / b.norm()).item() < 5e-3
        assert torch.allclose(prefill_logits(chan.engine, p), a, atol=1e-4, rtol=1e-4)
        # Per-tensor scales round each weight differently from per-channel ones (e4m3 keeps ~6% per
        # element either way); over the layers that is 0.12 of the logits' norm on an H200.
        c = prefill_logits(tens.engine, p)
        assert ((c - a).norm() / a.norm()).item() < 0.25
    monkeypatch.setenv("PAGEDSERVE_FP8_TRITON_MAX_M", "0")  # every prefill through W8A8 (_scaled_mm)
    for p in _prompts(3):
        a, b = prefill_logits(gpu.engine, p), prefill_logits(cpu.engine, p).cuda()
        # Not fp32-tight: _scaled_mm rounds its output to bf16, and that tiny difference flips the e4m3
        # rounding of some elements of the next layer's per-token activation quantization (each flip is a
        # ~6% error on that element), which compounds over the layers: 0.06 measured on an H200.
        assert ((a - b).norm() / b.norm()).item() < 0.1
        assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() > 0.5  # most positions
        # Exact part: the per-channel checkpoint and on-the-fly quantization on the same device agree.
        assert torch.allclose(prefill_logits(chan.engine, p), a, atol=1e-4, rtol=1e-4)
    monkeypatch.delenv("PAGEDSERVE_FP8_TRITON_MAX_M")
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    toks = [[o.outputs[0].token_ids for o in e.generate(_prompts(4), params, use_tqdm=False)] for e in (gpu, eager)]
    assert toks[0] == toks[1]


@needs_fp8
def test_fp8_kv_cache_on_gpu(dirs):
    """--kv-cache-dtype fp8: twice the blocks of a bf16 cache in the same memory; logits within fp8 error of
    the bf16 cache; CUDA graphs (decode over the fp8 cache) give the eager tokens."""
    from pagedserve.bench.quality import prefill_logits

    _, path = dirs["llama"]
    kw = dict(model=str(path), dtype="bfloat16", max_model_len=256, kv_cache_memory=0.5)
    base, fp8 = LLM(**kw), LLM(kv_cache_dtype="fp8", **kw)
    eager = LLM(kv_cache_dtype="fp8", enforce_eager=True, **kw)
    assert fp8.engine.runner.kv_caches[0][0].dtype == torch.float8_e4m3fn
    assert fp8.engine.num_kv_blocks == pytest.approx(2 * base.engine.num_kv_blocks, abs=2)
    for p in _prompts(3):
        a, b = prefill_logits(fp8.engine, p), prefill_logits(base.engine, p)
        assert 0 < ((a - b).norm() / b.norm()).item() < 0.15
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    toks = [[o.outputs[0].token_ids for o in e.generate(_prompts(4), params, use_tqdm=False)] for e in (fp8, eager)]
    assert toks[0] == toks[1]


@needs_fp8
def test_fp8_vs_bf16_on_a_real_shape(tmp_path):
    """Qwen2.5-0.5B's shape (24 layers), dummy weights (the same seeded draws for both engines): fp8 weights
    + fp8 KV against bf16. Random weights give near-flat logits, the hardest case for greedy agreement;
    bounds are loose, the printed numbers are the measurement (the 7B shape is in benchmarks/gpu_quant.py)."""
    import json as _json

    from pagedserve.bench.quality import prefill_logits, teacher_forced_agreement
    from pagedserve.plan import KNOWN_MODELS
    from tests.tiny_models import tokenizer

    cfg = dict(KNOWN_MODELS["Qwen/Qwen2.5-0.5B-Instruct"])
    cfg.pop("torch_dtype", None)
    cfg.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1e6,
               eos_token_id=0, bos_token_id=1)
    (tmp_path / "config.json").write_text(_json.dumps(cfg))
    tokenizer().save_pretrained(tmp_path)
    kw = dict(model=str(tmp_path), load_format="dummy", dtype="bfloat16", max_model_len=1024, kv_cache_memory=2.0)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, cfg["vocab_size"], (4, 128), generator=g).tolist()
    ref = LLM(**kw)
    ref_logits = [prefill_logits(ref.engine, p) for p in prompts]
    cont = [list(o.outputs[0].token_ids) for o in ref.generate(
        prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)]
    del ref
    for name, extra in (("fp8", {}), ("fp8+fp8kv", {"kv_cache_dtype": "fp8"})):
        llm = LLM(quantization="fp8", **kw, **extra)
        rel = max(((prefill_logits(llm.engine, p) - r).norm() / r.norm()).item() for p, r in zip(prompts, ref_logits))
        tf = [teacher_forced_agreement(llm.engine, p, c) for p, c in zip(prompts, cont)]
        agree = sum(a for a, _ in tf) / sum(t for _, t in tf)
        print(f"{name}: logit rel err {rel:.3e}, teacher-forced greedy agreement {agree:.1%}")
        assert rel < 0.25 and agree >= 0.5
        del llm
