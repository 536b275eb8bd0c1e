"""FP8 Triton paths: the KV cache stored as e4m3 (the fp8 GEMM kernels: tests/quantization/test_triton_w8a8.py).

Compiled on CUDA; through Triton's CPU interpreter elsewhere (tests/triton_interp.py). The interpreter
handles tl.float8e4nv loads, stores and conversions (checked here against torch's casts), so the KV
write -> decode / prefill read path runs on the CPU too. What stays GPU-only: `torch._scaled_mm`
(tests/test_gpu.py) and the speed.
"""
from __future__ import annotations

import pytest
import torch

from pagedserve.model.layers.attention import (TorchAttentionBackend, paged_decode_attention_ref,
                                               paged_prefill_attention_ref)
from pagedserve.quantization.fp8 import FP8, quantize_kv

from tests.triton_interp import DEVICE, fp8_close, import_kernels, interpreter_fixture, subprocess_test

TA, _NEEDS_SUBPROCESS = import_kernels("pagedserve.model.kernels.triton_attention", lambda m: m._INTERPRETED)
_interpret = interpreter_fixture(_NEEDS_SUBPROCESS)
test_in_subprocess = subprocess_test(__file__, _NEEDS_SUBPROCESS)

from tests.model.test_triton_attention import _block_tables, _mixed_meta, _rand_cache  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_fp8_matches_reference(dtype):
    t, kvh, d, bs, nb = 11, 3, 64, 4, 8
    g = torch.Generator().manual_seed(3)
    k = (torch.randn(t, kvh, d, generator=g) * 200).to(dtype).to(DEVICE)  # some values saturate at scale 0.5
    v = torch.randn(t, kvh, d, generator=g).to(dtype).to(DEVICE)
    slots = torch.tensor([5, -1, 0, 15, 7, 8, 9, 30, 31, 1, 2], device=DEVICE)
    kc = torch.zeros(nb, bs, kvh, d, dtype=FP8, device=DEVICE)
    vc = torch.zeros_like(kc)
    TA.write_kv_triton(k, v, kc, vc, slots, k_scale=0.5, v_scale=0.01)
    keep = slots >= 0
    want_k, want_v = quantize_kv(k[keep], 0.5), quantize_kv(v[keep], 0.01)
    fp8_close(kc.view(-1, kvh, d)[slots[keep]], want_k)
    fp8_close(vc.view(-1, kvh, d)[slots[keep]], want_v)
    assert kc.float().abs().max().item() == 448.0  # saturated, not NaN/inf
    written = torch.zeros(nb * bs, dtype=torch.bool, device=DEVICE)
    written[slots[keep]] = True
    assert (kc.view(-1, kvh, d)[~written].float() == 0).all()


def _fp8_cache(nb, bs, kvh, d, seed):
    kc, vc = _rand_cache(nb, bs, kvh, d, torch.float32, seed=seed)
    return quantize_kv(kc * 3, 0.5), quantize_kv(vc, 0.25)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_reads_fp8_cache(num_splits):
    """Decode over an e4m3 cache == fp32 decode over the dequantized cache (scale x e4m3)."""
    h, kvh, d, bs, nb = 8, 2, 32, 4, 40
    lens_l = [1, 4, 13, 37]
    kc, vc = _fp8_cache(nb, bs, kvh, d, seed=5)
    lens = torch.tensor(lens_l, dtype=torch.int32, device=DEVICE)
    bt = _block_tables(lens_l, bs, nb)
    q = torch.randn(len(lens_l), h, d, generator=torch.Generator().manual_seed(6)).bfloat16().to(DEVICE)
    ref = paged_decode_attention_ref(q.float(), kc.float() * 0.5, vc.float() * 0.25, bt, lens, d ** -0.5)
    out = TA.paged_decode_attention_triton(q, kc, vc, bt, lens, d ** -0.5, max(lens_l), num_splits=num_splits,
                                           block_n=16, k_scale=0.5, v_scale=0.25)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max().item() < 3e-2


def test_prefill_reads_fp8_cache():
    h, kvh, d, bs = 8, 2, 32, 4
    ctx, qlens = [45, 21, 9], [19, 1, 9]
    nb = sum((c + bs - 1) // bs for c in ctx) + 3
    kc, vc = _fp8_cache(nb, bs, kvh, d, seed=11)
    bt = _block_tables(ctx, bs, nb, seed=11)
    qs = [0, 19, 20, 29]
    q = torch.randn(29, h, d, generator=torch.Generator().manual_seed(12)).bfloat16().to(DEVICE)
    ref = paged_prefill_attention_ref(q.float(), kc.float() * 0.5, vc.float() * 0.25, bt, qs, ctx, d ** -0.5)
    out = TA.paged_prefill_attention_triton(
        q, kc, vc, bt, torch.tensor(qs, dtype=torch.int32, device=DEVICE),
        torch.tensor(ctx, dtype=torch.int32, device=DEVICE), max(qlens), d ** -0.5, block_m=16, block_n=16,
        k_scale=0.5, v_scale=0.25)
    assert (out.float() - ref).abs().max().item() < 5e-2


def test_backend_fp8_cache_matches_torch_backend():
    """Mixed decode + prefill step through both backends with an fp8 cache and scales: same cache bytes
    (to one e4m3 step), same outputs."""
    h, kvh, d, bs, nb = 9, 3, 64, 16, 24
    meta, t = _mixed_meta([1, 16, 40], [20, 50], [20, 18], bs, nb, seed=31)
    g = torch.Generator().manual_seed(32)
    q = torch.randn(t, h, d, generator=g).bfloat16().to(DEVICE)
    k = torch.randn(t, kvh, d, generator=g).bfloat16().to(DEVICE)
    v = torch.randn(t, kvh, d, generator=g).bfloat16().to(DEVICE)
    kc, vc = _fp8_cache(nb, bs, kvh, d, seed=33)
    kr, vr = kc.clone().cpu(), vc.clone().cpu()
    tri = TA.TritonAttentionBackend(k_scale=0.5, v_scale=0.25)
    ref_backend = TorchAttentionBackend()
    ref_backend.k_scale, ref_backend.v_scale = 0.5, 0.25
    out = tri.forward(q, k, v, kc, vc, meta, d ** -0.5)
    cpu_meta = meta
    if DEVICE.type == "cuda":  # the reference runs on the CPU
        import dataclasses

        cpu_meta = dataclasses.replace(meta, **{f: getattr(meta, f).cpu() for f in (
            "slot_mapping", "decode_block_tables", "decode_seq_lens", "prefill_query_start", "prefill_seq_lens",
            "prefill_block_tables")}, derived={})
    ref_backend.forward(q.float().cpu(), k.float().cpu(), v.float().cpu(), kr, vr, cpu_meta, d ** -0.5)
    fp8_close(kc.cpu(), kr)  # the write
    fp8_close(vc.cpu(), vr)
    # The read: the torch backend's attention over the cache the Triton kernel wrote.
    ref = ref_backend._attend(q.float().cpu(), k.float().cpu(), v.float().cpu(), kc.cpu(), vc.cpu(),
                              cpu_meta, d ** -0.5 * 0.5, 0, 0.0) * 0.25  # no window, no soft-cap
    assert (out.float().cpu() - ref).abs().max().item() < 3e-2
