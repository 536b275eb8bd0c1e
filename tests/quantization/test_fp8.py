"""FP8 (e4m3) weights, activations and KV cache on the CPU: arithmetic, refusals, checkpoints, planning.

The FP8 GEMMs (our Triton W8A8 kernel, `torch._scaled_mm`) run fast on an Ada/Hopper GPU only:
tests/test_gpu.py checks them there against the reference arithmetic tested here. The Triton kernels run
through the interpreter too: the per-token quant and the W8A8 GEMM in tests/quantization/test_triton_w8a8.py, the fp8
KV write/read in tests/quantization/test_triton_fp8.py.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pagedserve import LLM, SamplingParams
from pagedserve.config import EngineConfig
from pagedserve.errors import ConfigError, UnsupportedModelError
from pagedserve.model.layers.attention import TorchAttentionBackend, paged_decode_attention_ref, write_kv
from pagedserve.model.attention_metadata import AttentionMetadata
from pagedserve.quantization.fp8 import (FP8, FP8_MAX, Fp8Linear, check_fp8_device, fp8_linear, fp8_linear_reference,
                                  quantize_fp8_rows, quantize_kv)
from pagedserve.quantization.fp8_format import Fp8CheckpointConfig, quantization_config, write_fp8_checkpoint
from pagedserve.quantization.methods import quantize_model
from tests.tiny_models import build_hf, save

# e4m3 has 3 mantissa bits: round to nearest is off by at most 2^-4 relative (normal range).
E4M3_REL = 2.0 ** -4


# ------------------------------------------------------------------ arithmetic
def test_e4m3_grid_and_saturation():
    vals = torch.tensor([0.0, 1.0, 1.0625, 1.125, 448.0, 500.0, -1e6, 2.0 ** -9])
    q = vals.clamp(-FP8_MAX, FP8_MAX).to(FP8).float()
    # 1.0625 is halfway between 1 and 1.125: ties to even (1.0); beyond 448 saturates; 2^-9 is the smallest subnormal
    assert q.tolist() == [0.0, 1.0, 1.0, 1.125, 448.0, 448.0, -448.0, 2.0 ** -9]
    assert quantize_kv(torch.tensor([1e5, -1e5, 3.0]), 2.0).float().tolist() == [448.0, -448.0, 1.5]


def test_per_channel_weight_quantization_round_trip():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 80, generator=g) * torch.logspace(-3, 1, 24).unsqueeze(1)  # rows of very different size
    q, s = quantize_fp8_rows(w)
    assert q.dtype == FP8 and q.shape == w.shape and s.shape == (24,) and s.dtype == torch.float32
    # Each row's largest magnitude maps to 448 exactly: the full e4m3 range is used per channel.
    assert torch.equal(q.float().abs().amax(1), torch.full((24,), FP8_MAX))
    torch.testing.assert_close(s, w.abs().amax(1) / FP8_MAX)
    deq = q.float() * s.unsqueeze(1)
    # Per element: half an e4m3 step, i.e. <= 2^-4 relative in the normal range, plus the subnormal floor.
    bound = E4M3_REL * w.abs() + 2.0 ** -10 * s.unsqueeze(1)
    assert ((deq - w).abs() <= bound).all()
    # Per row, relative to the row's size (scales differ by 10^4 across rows, errors do not).
    rel = (deq - w).norm(dim=1) / w.norm(dim=1)
    assert rel.max() < 0.04


def test_per_token_activation_scales():
    x = torch.tensor([[1.0, -2.0, 4.0, 0.5], [0.0, 0.0, 0.0, 0.0], [1e-3, 0, 0, 0]])
    q, s = quantize_fp8_rows(x)
    assert torch.allclose(s, torch.tensor([4.0, 0.0, 1e-3]) / FP8_MAX, rtol=0, atol=1e-12) or s[1] > 0
    assert s[1] > 0 and torch.equal(q[1].float(), torch.zeros(4))  # an all-zero row: no NaN from 0/0
    assert q[0].float().tolist() == [112.0, -224.0, 448.0, 56.0]  # powers of two times 448/4 are exact


def test_fp8_linear_matches_fp32_reference_of_quantized_operands():
    """Fp8Linear's CPU arithmetic, the same W8A8 scheme the GPU kernels run at every batch size:
    (quantized x) @ (quantized w)^T in fp32, scaled: exact up to fp32 summation order, and within fp8
    error of the dense layer, for one row (decode) as for many."""
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(64, 48, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g) * 0.1)
        lin.bias.copy_(torch.randn(48, generator=g))
    m = Fp8Linear.from_linear(lin)
    assert m.weight.dtype == FP8 and m.weight_scale.dtype == torch.float32
    for rows in (1, 22):
        x = torch.randn(1, rows, 64, generator=g)
        qx, sx = quantize_fp8_rows(x.reshape(-1, 64))
        ref = ((qx.double() @ m.weight.double().t()) * sx.double().unsqueeze(1) * m.weight_scale.double()
               + lin.bias.double())
        y = m(x)
        assert y.shape == (1, rows, 48) and y.dtype == torch.float32
        torch.testing.assert_close(y.reshape(-1, 48).double(), ref, rtol=1e-6, atol=1e-6)
        dense = lin(x)
        rel = ((y - dense).norm() / dense.norm()).item()
        assert 0 < rel < 0.05, rel
    # bf16 activations: the same arithmetic, rounded once to bf16 at the end.
    yb = fp8_linear_reference(x.bfloat16(), m.weight, m.weight_scale, m.bias)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), fp8_linear_reference(x.bfloat16().float(), m.weight, m.weight_scale,
                                                                m.bias), rtol=2 ** -7, atol=1e-3)


def test_fp8_linear_keeps_dtypes_through_module_to():
    m = Fp8Linear.from_linear(nn.Linear(32, 16))
    w = m.weight.clone()
    m.to(torch.bfloat16)
    assert m.weight.dtype == FP8 and m.weight_scale.dtype == torch.float32 and m.bias.dtype == torch.bfloat16
    assert torch.equal(m.weight.view(torch.uint8), w.view(torch.uint8))  # e4m3 -> bf16 -> e4m3 is lossless


def test_quantize_model_fp8_keeps_lm_head_dense():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 16)
            self.lm_head = nn.Linear(16, 10)

    m = M()
    assert quantize_model(m, "fp8") == 1
    assert isinstance(m.proj, Fp8Linear) and type(m.lm_head) is nn.Linear


# ------------------------------------------------------------------ refusals
def test_refused_on_cpu_with_one_line():
    with pytest.raises(ConfigError) as e:
        check_fp8_device(torch.device("cpu"))
    msg = str(e.value.message)
    assert msg == "--quantization fp8 needs an NVIDIA GPU with compute capability >= 8.9 (Ada) / 9.0 (Hopper); " \
                  "this is the CPU"
    assert "\n" not in msg and e.value.param == "quantization"


@pytest.mark.parametrize("cap, ok", [((8, 0), False), ((7, 5), False), ((8, 6), False), ((8, 9), True), ((9, 0), True)])
def test_refused_on_pre_ada_gpu(monkeypatch, cap, ok):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda idx=None: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda idx=None: "NVIDIA Test GPU")
    dev = torch.device("cuda", 0)
    if ok:
        check_fp8_device(dev)
        return
    with pytest.raises(ConfigError, match=rf"this GPU \(NVIDIA Test GPU\) has compute capability {cap[0]}\.{cap[1]}"):
        check_fp8_device(dev)
    with pytest.raises(ConfigError, match="--kv-cache-dtype fp8 needs") as e:
        check_fp8_device(dev, param="kv_cache_dtype", what="--kv-cache-dtype fp8")
    assert e.value.param == "kv_cache_dtype"


def test_engine_refuses_fp8_weights_on_cpu_and_bad_kv_dtype(tmp_path, monkeypatch):
    monkeypatch.delenv("PAGEDSERVE_FP8_EMULATE", raising=False)
    dense = str(save(build_hf("llama"), tmp_path / "dense"))
    with pytest.raises(ConfigError, match="this is the CPU"):
        LLM(dense, quantization="fp8", max_model_len=128, kv_cache_memory=0.05)
    with pytest.raises(ConfigError, match="kv_cache_dtype must be auto, fp8 or fp8_e4m3"):
        EngineConfig(kv_cache_dtype="fp8_e5m2")


def test_cli_flags_reach_engine_config():
    import argparse

    from pagedserve.entrypoints.generate_cli import add_engine_args, engine_kwargs

    p = argparse.ArgumentParser()
    add_engine_args(p)
    kw = engine_kwargs(p.parse_args(["--quantization", "fp8", "--kv-cache-dtype", "fp8"]), None)
    assert kw["quantization"] == "fp8" and kw["kv_cache_dtype"] == "fp8"
    assert EngineConfig.from_kwargs(**kw).kv_cache_dtype == "fp8"


# ------------------------------------------------------------------ fp8 KV cache (torch backend)
def test_kv_write_read_fp8_reference():
    """fp8 cache: stored bytes are e4m3(x / scale); decode attention over it equals fp32 attention over the
    dequantized cache (scale x e4m3), and stays within fp8 error of the unquantized cache."""
    g = torch.Generator().manual_seed(4)
    nb, bs, kvh, h, d = 6, 4, 2, 4, 16
    t = 20
    k, v = torch.randn(t, kvh, d, generator=g) * 3, torch.randn(t, kvh, d, generator=g)
    kc = torch.zeros(nb, bs, kvh, d, dtype=FP8)
    vc = torch.zeros_like(kc)
    slots = torch.arange(t)
    write_kv(k, v, kc, vc, slots, k_scale=0.5, v_scale=0.25)
    assert torch.equal(kc.view(-1, kvh, d)[:t].view(torch.uint8), quantize_kv(k, 0.5).view(torch.uint8))
    assert torch.equal(vc.view(-1, kvh, d)[:t].view(torch.uint8), quantize_kv(v, 0.25).view(torch.uint8))

    backend = TorchAttentionBackend()
    backend.k_scale, backend.v_scale = 0.5, 0.25
    q = torch.randn(2, h, d, generator=g)
    bt = torch.tensor([[0, 1, 2, 0, 0], [3, 4, 0, 0, 0]], dtype=torch.int32)
    lens = torch.tensor([11, 7], dtype=torch.int32)
    # The decode step writes its own token (slot 10 and 12+6=18) first, then attends.
    newk, newv = torch.randn(2, kvh, d, generator=g), torch.randn(2, kvh, d, generator=g)
    meta = AttentionMetadata(slot_mapping=torch.tensor([10, 18]), num_decode=2, decode_block_tables=bt,
                             decode_seq_lens=lens, prefill_query_start=torch.tensor([0], dtype=torch.int32),
                             prefill_seq_lens=torch.tensor([0], dtype=torch.int32),
                             prefill_block_tables=torch.zeros(1, 1, dtype=torch.int32), decode_max_seq_len=11)
    out = backend.forward(q, newk, newv, kc, vc, meta, d ** -0.5)
    kd, vd = kc.float() * 0.5, vc.float() * 0.25
    ref = paged_decode_attention_ref(q, kd, vd, bt, lens, d ** -0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # Against the exact (unquantized) cache: within fp8 error.
    ke, ve = torch.zeros(nb, bs, kvh, d), torch.zeros(nb, bs, kvh, d)
    write_kv(torch.cat([k, newk]), torch.cat([v, newv]), ke, ve, torch.cat([slots, torch.tensor([10, 18])]))
    exact = paged_decode_attention_ref(q, ke, ve, bt, lens, d ** -0.5)
    assert ((out - exact).abs().max() / exact.abs().max()).item() < 0.1


# ------------------------------------------------------------------ checkpoints
def _fp8_hf(hf_model, fp8_dir):
    """The HF model with each projection computing the fp8 arithmetic (`fp8_linear`: the checkpoint's e4m3
    weight and scales times the activation, quantized per token, as the engine does): an independent forward pass."""
    from safetensors.torch import load_file

    sd = load_file(str(fp8_dir / "model.safetensors"))
    for name, mod in hf_model.named_modules():
        key = name + ".weight"
        if isinstance(mod, nn.Linear) and key + "_scale" in sd:
            q, s = sd[key], sd[key + "_scale"].float().reshape(-1).expand(sd[key].shape[0])
            mod.forward = lambda x, q=q, s=s, b=mod.bias: fp8_linear(x, q, s, b)
    return hf_model


@pytest.mark.parametrize("scheme", ["tensor", "channel"])
def test_fp8_checkpoint_round_trip_on_cpu(tmp_path, monkeypatch, scheme):
    """write_fp8_checkpoint -> the engine detects it, loads the e4m3 weights without re-quantizing
    (bit-identical), and (emulated on the CPU) its logits match the dequantized HF model."""
    monkeypatch.setenv("PAGEDSERVE_FP8_EMULATE", "1")
    dense = save(build_hf("llama"), tmp_path / "dense")
    fp8_dir = write_fp8_checkpoint(dense, tmp_path / "fp8", scheme=scheme)
    cfg = json.loads((fp8_dir / "config.json").read_text())
    assert cfg["quantization_config"] == quantization_config(scheme)
    from safetensors.torch import load_file

    sd = load_file(str(fp8_dir / "model.safetensors"))
    wq = sd["model.layers.0.self_attn.k_proj.weight"]
    ws = sd["model.layers.0.self_attn.k_proj.weight_scale"]
    assert wq.dtype == FP8 and ws.dtype == torch.float32
    assert ws.shape == (() if scheme == "tensor" else (wq.shape[0], 1))

    llm = LLM(str(fp8_dir), max_model_len=128, kv_cache_memory=0.05, dtype="float32")  # detected from config.json
    eng = llm.engine
    assert eng.quantization == "fp8"
    layers = [m for m in eng.model.modules() if isinstance(m, Fp8Linear)]
    assert len(layers) == 2 * 4  # qkv, o, gate_up, down per layer
    qkv = eng.model.layers[0].self_attn.qkv_proj
    a = eng.args
    k_rows = slice(a.num_heads * a.head_dim, (a.num_heads + a.num_kv_heads) * a.head_dim)
    assert torch.equal(qkv.weight[k_rows].view(torch.uint8), wq.view(torch.uint8))  # not re-quantized
    assert torch.equal(qkv.weight_scale[k_rows], ws.reshape(-1).expand(wq.shape[0]))

    ids = [5, 17, 42, 99, 7, 3, 250, 31]
    from pagedserve.bench.quality import prefill_logits

    got = prefill_logits(eng, ids)
    with torch.no_grad():
        want = _fp8_hf(build_hf("llama"), fp8_dir)(torch.tensor([ids])).logits[0]
        dense_logits = build_hf("llama")(torch.tensor([ids])).logits[0]
    # Same arithmetic, independent code: only fp32 rounding differs (which can flip an activation's e4m3
    # rounding now and then, hence not 1e-6).
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 5e-3, rel
    # And fp8 stays near the dense model (this tiny model has large random weights: ~10% here).
    assert ((got - dense_logits).norm() / dense_logits.norm()).item() < 0.25
    out = llm.generate(["the quick"], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_fp8_on_load_matches_checkpoint_path(tmp_path, monkeypatch):
    """--quantization fp8 on a dense checkpoint == loading the per-channel fp8 checkpoint of it."""
    monkeypatch.setenv("PAGEDSERVE_FP8_EMULATE", "1")
    from pagedserve.bench.quality import prefill_logits

    dense = save(build_hf("llama"), tmp_path / "dense")
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    a = LLM(str(dense), quantization="fp8", max_model_len=128, kv_cache_memory=0.05, dtype="float32")
    la = prefill_logits(a.engine, ids)
    del a
    b = LLM(str(write_fp8_checkpoint(dense, tmp_path / "fp8c", scheme="channel")), max_model_len=128,
            kv_cache_memory=0.05, dtype="float32")
    torch.testing.assert_close(prefill_logits(b.engine, ids), la, rtol=1e-5, atol=1e-5)


def test_fp8_kv_cache_engine_on_cpu(tmp_path):
    """--kv-cache-dtype fp8 on the CPU (torch backend): the block count doubles for the same memory and
    the logits move by fp8 error only (this tiny random model is touchy: measured 6% relative, argmax
    unchanged on every position in fp32)."""
    from pagedserve.bench.quality import prefill_logits

    dense = str(save(build_hf("llama"), tmp_path / "dense"))
    a = LLM(dense, max_model_len=128, kv_cache_memory=0.05, dtype="float32")
    b = LLM(dense, max_model_len=128, kv_cache_memory=0.05, dtype="float32", kv_cache_dtype="fp8")
    assert b.engine.runner.kv_caches[0][0].dtype == FP8
    assert b.engine.kv_bytes_per_block() * 4 == a.engine.kv_bytes_per_block()  # fp32 -> 1 byte
    assert b.engine.num_kv_blocks == pytest.approx(4 * a.engine.num_kv_blocks, abs=4)
    ids = list(range(5, 60, 3))
    la, lb = prefill_logits(a.engine, ids), prefill_logits(b.engine, ids)
    rel = ((la - lb).norm() / la.norm()).item()
    assert 0 < rel < 0.15, rel  # > 0: the fp8 cache is really what attention read
    assert (la.argmax(-1) == lb.argmax(-1)).float().mean().item() >= 0.8
    out = b.generate(["the quick brown fox"], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                     use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 8


@pytest.mark.parametrize("qc, msg", [
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "block-wise"),
    ({"quant_method": "fp8", "ignored_layers": ["model.layers.0.mlp.down_proj"]}, "unquantized"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 128}}}},
     "strategy 'group'"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "int"}}}}, "activations are 8-bit 'int'"),
])
def test_bad_fp8_configs_refused(qc, msg):
    with pytest.raises(UnsupportedModelError, match=msg):
        Fp8CheckpointConfig.from_hf(qc)


def test_fp8_checkpoint_dummy_load(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_FP8_EMULATE", "1")
    fp8_dir = write_fp8_checkpoint(save(build_hf("llama"), tmp_path / "dense"), tmp_path / "fp8")
    llm = LLM(str(fp8_dir), max_model_len=128, kv_cache_memory=0.05, load_format="dummy")
    lin = llm.engine.model.layers[0].mlp.down_proj
    assert isinstance(lin, Fp8Linear) and lin.weight.float().std().item() > 0.5
    assert torch.equal(lin.weight_scale, torch.full_like(lin.weight_scale, 0.02))
    out = llm.generate(["the"], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2


def test_fp8_checkpoint_conflicts(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_FP8_EMULATE", "1")
    fp8_dir = write_fp8_checkpoint(save(build_hf("llama"), tmp_path / "dense"), tmp_path / "fp8")
    with pytest.raises(ConfigError, match="conflicts with this fp8 checkpoint"):
        LLM(str(fp8_dir), quantization="int8", max_model_len=128, kv_cache_memory=0.05)


# ------------------------------------------------------------------ planner
def test_plan_counts_fp8_weights_and_kv():
    from pagedserve.plan import GPUS, KNOWN_MODELS, ModelShape, PlanInput, make_plan

    name = next(n for n in KNOWN_MODELS if "8B" in n or "7B" in n)
    shape = ModelShape.from_config(KNOWN_MODELS[name], name)
    gpu = GPUS["h200-141gb"]
    bf16 = make_plan(PlanInput(model=shape, gpu=gpu, seq_len=4096))
    w8 = make_plan(PlanInput(model=shape, gpu=gpu, seq_len=4096, quantization="fp8"))
    kv8 = make_plan(PlanInput(model=shape, gpu=gpu, seq_len=4096, quantization="fp8", kv_cache_dtype="fp8"))
    assert w8.weights_gib < 0.6 * bf16.weights_gib
    assert kv8.kv_bytes_per_token * 2 == w8.kv_bytes_per_token
    assert kv8.num_blocks == pytest.approx(2 * w8.num_blocks, abs=1)
    assert kv8.max_concurrency >= 2 * w8.max_concurrency - 1
