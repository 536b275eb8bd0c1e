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


@pytest.mark.parametrize("m", [1, 16, 33, 100])
@pytest.mark.parametrize("n,k", [(11008, 4096), (4096, 11008)])
def test_awq_kernel_7b_shapes(m, n, k):
    """The Triton AWQ int4 GEMM (K-strided layout) on 7B-sized matrices against dequantize + F.linear; the
    split ones (few output tiles) reduce in the kernel, so also twice in a row (the counters re-armed)."""
    from pagedserve.quantization.awq_format import dequantize, rtn_quantize, to_kstrided
    from pagedserve.quantization.triton_quant import awq_linear

    g = torch.Generator().manual_seed(m)
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(m, k, generator=g).to("cuda", torch.bfloat16)
    qw, qz, sc = rtn_quantize(w, 128)
    ref = torch.nn.functional.linear(x.float(), dequantize(qw, qz, sc.bfloat16()).cuda())
    a, z = to_kstrided(qw, qz)
    for _ in range(2):
        y = awq_linear(x, a.cuda(), z.cuda(), sc.to("cuda", torch.bfloat16))
        assert ((y.float() - ref).abs().max() / ref.abs().max()).item() < 2e-2


def test_awq_on_gpu_matches_dequantized_model(dirs, tmp_path):
    """An AWQ checkpoint on the GPU (Triton int4 GEMM, CUDA graphs) vs the same weights dequantized to a
    dense checkpoint: fp32 logits within fp32 noise, greedy tokens equal, graphs equal eager."""
    from pagedserve.bench.quality import prefill_logits
    from pagedserve.quantization.awq_format import write_awq_checkpoint
    from tests.quantization.test_quantization import _dequantized_hf

    model, path = dirs["llama"]
    awq_dir = write_awq_checkpoint(path, tmp_path / "awq", group_size=32)
    deq_dir = save(_dequantized_hf(build_hf("llama"), awq_dir), tmp_path / "deq")
    awq = LLM(model=str(awq_dir), dtype="float32", max_model_len=256, kv_cache_memory=0.5)
    assert awq.engine.runner.graphs
    # down_proj (in 128) takes the K-strided Triton kernel; the 64-wide inputs the unpack-per-call path
    assert any(getattr(m, "kstrided", False) for m in awq.engine.model.modules())
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


# -- W8A8 (Triton; fp8 also _scaled_mm), fp8 KV cache; AWQ's large-M path -----------------------------
needs_fp8 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                               reason="needs compute capability >= 8.9")


@pytest.mark.parametrize("kind", ["fp8", "int8"])
@pytest.mark.parametrize("m", [1, 16, 300, 600])
def test_w8a8_gemm_7b_shapes(kind, m):
    """Per-token quant kernel + the Triton W8A8 GEMM (and, fp8, `_scaled_mm`) on 7B-sized matrices against
    the same arithmetic in fp32, and within quantization error of the dense product; the dispatch."""
    if kind == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability >= 8.9")
    from pagedserve.quantization.fp8 import FP8, fp8_linear, fp8_linear_cuda, fp8_linear_reference, quantize_fp8_rows
    from pagedserve.quantization.int8_w8a8 import int8_w8a8_reference, quantize_int8_rows_rne_away
    from pagedserve.quantization.dispatch import fp8_use_scaled_mm
    from pagedserve.quantization.methods import quantize_int8
    from pagedserve.quantization.triton_w8a8 import per_token_quant, w8a8_linear

    g = torch.Generator().manual_seed(m)
    for n, k in ((11008, 4096), (4096, 11008)):
        w = (torch.randn(n, k, generator=g) * 0.02).cuda()
        x = torch.randn(m, k, generator=g).to("cuda", torch.bfloat16)
        if kind == "fp8":
            qw, sw = quantize_fp8_rows(w)
            qx, sx = per_token_quant(x, FP8)
            rqx, rsx = quantize_fp8_rows(x)
            # Triton's fp32 division may differ from torch's by an ulp, which flips the e4m3 rounding of an
            # element lying on a rounding boundary (1 of ~2.6M at M=600): rare single-step differences only.
            diff = (qx.float() - rqx.float()).abs()
            assert (diff <= rqx.float().abs() / 8 + 2 ** -9).all() and (diff > 0).float().mean().item() < 1e-5
            ref = fp8_linear_reference(x.float(), qw, sw)
        else:
            qw, sw = quantize_int8(w)
            qx, sx = per_token_quant(x, torch.int8)
            rqx, rsx = quantize_int8_rows_rne_away(x)
            assert (qx.int() - rqx.int()).abs().max().item() <= 1  # x / s may differ by an ulp at a tie
            ref = int8_w8a8_reference(x.float(), qw, sw)
        assert torch.allclose(sx.squeeze(1), rsx, rtol=1e-6, atol=0)
        y = w8a8_linear(x, qw, sw)
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        assert ((y.float() - ref).abs().max() / ref.abs().max()).item() < 1e-2
        dense = torch.nn.functional.linear(x.float(), w)
        assert ((y.float() - dense).norm() / dense.norm()).item() < (0.06 if kind == "fp8" else 0.03)
        if kind == "fp8":
            ys = fp8_linear_cuda(x, qw, sw)
            assert ((ys.float() - ref).abs().max() / ref.abs().max()).item() < 1e-2
            assert torch.equal(fp8_linear(x, qw, sw), ys if fp8_use_scaled_mm(m, n, k) else y)


@pytest.mark.parametrize("m", [17, 256, 600])
def test_awq_large_m_path_7b_shape(m):
    """AWQ's large-M path: dequantize (one Triton pass) + cuBLAS."""
    from pagedserve.quantization.awq_format import dequantize, rtn_quantize, to_kstrided
    from pagedserve.quantization.triton_quant import awq_linear_dense

    g = torch.Generator().manual_seed(m)
    n, k = 11008, 4096
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(m, k, generator=g).to("cuda", torch.bfloat16)
    qw, qz, sc = rtn_quantize(w, 128)
    ref = torch.nn.functional.linear(x.float(), dequantize(qw, qz, sc.bfloat16()).cuda())
    a, z = to_kstrided(qw, qz)
    y = awq_linear_dense(x, a.cuda(), z.cuda(), sc.to("cuda", torch.bfloat16))
    assert ((y.float() - ref).abs().max() / ref.abs().max()).item() < 2e-2


def test_int8_w8a8_engine(dirs):
    """The int8 engine on the GPU (W8A8 at every batch size) vs the CPU's weight-only int8 engine on the
    same host-quantized weights: logits apart by the activation rounding only; CUDA graphs equal eager."""
    from pagedserve.bench.quality import prefill_logits
    from pagedserve.quantization.methods import Int8Linear

    _, path = dirs["qwen2"]
    # fp32 model: the activation rounding is the only difference from the CPU engine, and graph replays
    # (padded batches, other split-K tilings) cannot flip a near-tie through bf16 rounding.
    gpu = LLM(model=str(path), dtype="float32", max_model_len=256, kv_cache_memory=0.5, quantization="int8")
    cpu = LLM(model=str(path), device="cpu", max_model_len=256, kv_cache_memory=0.05, quantization="int8")
    assert any(isinstance(m, Int8Linear) and m.weight.is_cuda for m in gpu.engine.model.modules())
    for p in _prompts(3):
        a, b = prefill_logits(gpu.engine, p).cpu(), prefill_logits(cpu.engine, p)
        assert 0 < ((a - b).norm() / b.norm()).item() < 0.05  # > 0: the W8A8 path really ran
    eager = LLM(model=str(path), dtype="float32", max_model_len=256, kv_cache_memory=0.5, quantization="int8",
                enforce_eager=True)
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    toks = [[o.outputs[0].token_ids for o in e.generate(_prompts(4), params, use_tqdm=False)] for e in (gpu, eager)]
    assert toks[0] == toks[1]


@needs_fp8
def test_fp8_engine_matches_cpu_emulation_and_checkpoints(dirs, tmp_path, monkeypatch):
    """--quantization fp8 on the GPU vs the CPU's emulated fp8 engine (the same W8A8 arithmetic), both GPU
    paths, each forced with PAGEDSERVE_FP8_SCALED_MM_M (read at every call): the Triton kernel (fp32
    output) and `_scaled_mm` (bf16 output). Either way the devices' fp32 noise flips the e4m3 rounding
    of a few activation elements (each flip a ~6% error on that element), which compounds over the
    layers: 0.04 (Triton) and 0.06 (`_scaled_mm`) of the logits' norm on an H200. The per-channel fp8
    checkpoint of the same model gives the very same weights (checked parameter by parameter); the
    per-tensor one stays close; CUDA graphs equal eager."""
    from pagedserve.bench.quality import prefill_logits
    from pagedserve.quantization.fp8_format import write_fp8_checkpoint

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
    # The per-channel checkpoint holds the very same weights and scales as quantizing on load.
    pa, pb = dict(gpu.engine.model.named_parameters()), dict(chan.engine.model.named_parameters())
    assert pa.keys() == pb.keys()
    assert all(pa[k].dtype == pb[k].dtype and torch.equal(pa[k].float(), pb[k].float()) for k in pa)
    monkeypatch.setenv("PAGEDSERVE_FP8_SCALED_MM_M", "0,0")  # every GEMM through the Triton kernel
    for p in _prompts(3):
        a, b = prefill_logits(gpu.engine, p), prefill_logits(cpu.engine, p).cuda()
        assert ((a - b).norm() / b.norm()).item() < 0.1
        assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() > 0.5  # most positions
        # Same weights, but two engines' attention splits differ (their pools differ): 2e-6 of fp32 noise
        # (measured), which can flip an e4m3 rounding like the CPU's noise does.
        ch = prefill_logits(chan.engine, p)
        assert ((ch - a).norm() / a.norm()).item() < 0.1
        # Per-tensor scales round each weight differently from per-channel ones (e4m3 keeps ~6% per
        # element either way); over the layers that is 0.12 of the logits' norm on an H200.
        c = prefill_logits(tens.engine, p)
        assert ((c - a).norm() / a.norm()).item() < 0.25
    monkeypatch.setenv("PAGEDSERVE_FP8_SCALED_MM_M", "0,1000000000")  # every GEMM through `_scaled_mm`
    for p in _prompts(3):
        a, b = prefill_logits(gpu.engine, p), prefill_logits(cpu.engine, p).cuda()
        assert ((a - b).norm() / b.norm()).item() < 0.1
        assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() > 0.5  # most positions
        assert ((prefill_logits(chan.engine, p) - a).norm() / a.norm()).item() < 0.1
    monkeypatch.delenv("PAGEDSERVE_FP8_SCALED_MM_M")
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    toks = [[o.outputs[0].token_ids for o in e.generate(_prompts(4), params, use_tqdm=False)] for e in (gpu, eager)]
    assert toks[0] == toks[1]


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_fused_activation_quant_is_exact(dirs, monkeypatch, kind):
    """The norms writing the per-token quantized activation themselves (layers.linear.input_quant)
    give bit-identical logits to the linears quantizing it with their own kernel: the same values go
    through the same quantize helper. bf16, where any extra or missing rounding would show."""
    if kind == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability >= 8.9")
    from pagedserve.bench.quality import prefill_logits
    from pagedserve.model.layers import linear

    _, path = dirs["qwen2"]
    eng = LLM(model=str(path), dtype="bfloat16", max_model_len=256, kv_cache_memory=0.5,
              quantization=kind).engine
    asked, real = [], linear.input_quant
    monkeypatch.setattr(linear, "input_quant", lambda lin, x: asked.append(real(lin, x)) or asked[-1])
    fused = [prefill_logits(eng, p) for p in _prompts(3)]
    want = torch.float8_e4m3fn if kind == "fp8" else torch.int8
    assert asked and all(a == want for a in asked)  # every norm before a projection was asked
    monkeypatch.setattr(linear, "input_quant", lambda lin, x: None)
    for p, f in zip(_prompts(3), fused):
        assert torch.equal(prefill_logits(eng, p), f)


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
