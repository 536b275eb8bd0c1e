"""The fused Triton MoE (kernels/fused_moe.py) against the layer's CPU path (layers/moe.experts_reference).

Compiled on CUDA; through Triton's CPU interpreter elsewhere (tests/triton_interp.py), at tiny sizes so the
interpreter takes seconds. Token counts 1, 3, 17 and 300 cross the tile buckets; the expert loads include
skews where most experts get no slot, and one where every slot goes to one expert. H = 48 and I = 80 are
not multiples of the default N tiles, so the wrapped weight rows and dropped columns are exercised.
"""
from __future__ import annotations

import pytest
import torch

from pagedserve.model.layers.moe import experts_reference, route

from tests.triton_interp import DEVICE, ON_CUDA, import_kernels, interpreter_fixture, subprocess_test

FM, _NEEDS_SUBPROCESS = import_kernels("pagedserve.model.kernels.fused_moe", lambda m: m._interpreted())
_interpret = interpreter_fixture(_NEEDS_SUBPROCESS)
test_in_subprocess = subprocess_test(__file__, _NEEDS_SUBPROCESS)

H, I = 48, 80


def _weights(e: int, seed: int, h: int = H, inter: int = I):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(e, 2 * inter, h, generator=g) * h ** -0.5
    w2 = torch.randn(e, h, inter, generator=g) * inter ** -0.5
    return w13, w2


def _routing(t: int, e: int, k: int, skew: str, seed: int):
    """Router logits [T, E] whose top-k follow `skew`: uniform, hot (experts 0 and 1 take most slots, the
    upper half none) or single (every token's first choice is expert e - 1)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=g)
    if skew == "hot":
        logits[:, : e // 2] += 3.0
        logits[:, e // 2:] -= 30.0
        logits[:, :2] += 2.0
    elif skew == "single":
        logits[:, e - 1] += 50.0
    return route(logits, k, renormalize=True)


def _close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Up to one rounding to `dtype` per GEMM plus accumulation order; a wrong expert, slot, scale or
    routing weight is an error the size of a whole term."""
    assert y.dtype == dtype and y.shape == ref.shape
    y, ref = y.cpu().float(), ref.cpu().float()
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    err = ((y - ref).abs().max() / ref.abs().max().clamp(min=1e-6)).item()
    assert err < tol, err


@pytest.mark.parametrize("t", [1, 3, 17, 300])
@pytest.mark.parametrize("e,k,skew", [(4, 1, "uniform"), (8, 2, "hot"), (16, 4, "hot"), (8, 2, "single")])
def test_fused_moe_matches_cpu_path(t, e, k, skew):
    w13, w2 = _weights(e, seed=e)
    weights, ids = _routing(t, e, k, skew, seed=t + e)
    x = torch.randn(t, H, generator=torch.Generator().manual_seed(7))
    ref = experts_reference(x, w13, w2, weights, ids)
    d = DEVICE
    y = FM.fused_moe(x.to(d), w13.to(d), w2.to(d), weights.to(d), ids.to(d))
    _close(y, ref, torch.float32)
    if skew == "hot":
        assert torch.bincount(ids.flatten().long(), minlength=e)[e // 2:].eq(0).all()  # idle experts


@pytest.mark.parametrize("bm", [16, 32, 64])
def test_every_block_size_and_bf16(bm):
    e, k, t = 8, 2, 37
    w13, w2 = _weights(e, seed=3)
    weights, ids = _routing(t, e, k, "hot", seed=4)
    x = torch.randn(t, H, generator=torch.Generator().manual_seed(5)).bfloat16()
    tiles = FM.MoeTiles(bm, FM.GemmTiles(32, 16, 4, 2), FM.GemmTiles(16, 32, 4, 2))
    ref = experts_reference(x, w13.bfloat16(), w2.bfloat16(), weights, ids)
    d = DEVICE
    y = FM.fused_moe(x.to(d), w13.bfloat16().to(d), w2.bfloat16().to(d), weights.to(d), ids.to(d), tiles=tiles)
    _close(y, ref, torch.bfloat16)


@pytest.mark.parametrize("t", [1, 17])
def test_fp8_experts_match_dequantized_reference(t):
    """fp8 weights with per-row scales: the kernel equals the reference over the dequantized stacks."""
    from pagedserve.quantization.fp8 import quantize_fp8_rows

    e, k = 8, 2
    w13, w2 = _weights(e, seed=11)
    q13, s13 = quantize_fp8_rows(w13)
    q2, s2 = quantize_fp8_rows(w2)
    assert q13.shape == w13.shape and s13.shape == (e, 2 * I) and s2.shape == (e, H)
    weights, ids = _routing(t, e, k, "uniform", seed=12)
    x = torch.randn(t, H, generator=torch.Generator().manual_seed(13)).bfloat16()
    ref = experts_reference(x, q13, q2, weights, ids, s13, s2)
    d = DEVICE
    y = FM.fused_moe(x.to(d), q13.to(d), q2.to(d), weights.to(d), ids.to(d), s13.to(d), s2.to(d))
    _close(y, ref, torch.bfloat16)
    dense = experts_reference(x, w13.bfloat16(), w2.bfloat16(), weights, ids)
    assert ((ref.float() - dense.float()).norm() / dense.float().norm()).item() < 0.08  # fp8's own error


def test_align_slots_groups_by_expert_and_pads():
    ids = torch.tensor([[2, 0], [2, 3], [0, 2]], dtype=torch.int32)  # expert 1 gets nothing
    slots, experts = FM.align_slots_torch(ids.to(DEVICE), 4, 4)
    slots, experts = slots.cpu().tolist(), experts.cpu().tolist()
    s = 6
    assert len(slots) == len(experts) * 4 and len(slots) >= FM.max_padded_slots(6, 4, 4)
    # expert 0: slots 1, 4; expert 2: slots 0, 2, 5; expert 3: slot 3; each padded to 4 with the sentinel
    assert slots[:12] == [1, 4, s, s, 0, 2, 5, s, 3, s, s, s]
    assert experts[:3] == [0, 2, 3] and all(x == 4 for x in experts[3:])
    assert all(x == s for x in slots[12:])


@pytest.mark.parametrize("t,e,k,bm", [(1, 8, 2, 16), (3, 128, 8, 16), (37, 60, 4, 32), (300, 8, 2, 64)])
def test_align_kernel_equals_torch_align(t, e, k, bm):
    """The one-program Triton align (decode sizes) writes exactly what the torch ops write."""
    g = torch.Generator().manual_seed(t + e)
    ids = torch.randint(0, max(2, e // 3), (t, k), generator=g, dtype=torch.int32)  # many experts idle
    slots, experts = FM.align_slots_triton(ids.to(DEVICE), e, bm)
    want_slots, want_experts = FM.align_slots_torch(ids, e, bm)
    assert torch.equal(slots.cpu(), want_slots) and torch.equal(experts.cpu(), want_experts)


@pytest.mark.parametrize("e,k,renorm", [(8, 2, True), (60, 4, False), (128, 8, True), (5, 1, False)])
def test_route_kernel_equals_torch_route(e, k, renorm):
    g = torch.Generator().manual_seed(e)
    logits = torch.randn(19, e, generator=g) * 3  # fp32: no exact ties (their order is either's choice)
    w, ids = FM.route(logits.to(DEVICE), k, renorm)
    want_w, want_ids = route(logits, k, renorm)
    assert ids.dtype == torch.int32 and torch.equal(ids.cpu(), want_ids)
    torch.testing.assert_close(w.cpu(), want_w, rtol=1e-5, atol=1e-6)
    bad = logits.clone()
    bad[3] = float("nan")
    bad[5, 0] = float("inf")
    w, ids = FM.route(bad.to(DEVICE), k, renorm)
    assert ids.cpu().min() >= 0 and ids.cpu().max() < e  # a NaN row still names real experts
    keep = [i for i in range(19) if i not in (3, 5)]
    assert torch.equal(ids.cpu()[keep], want_ids[keep]) and torch.equal(w.cpu()[keep], FM.route(
        logits.to(DEVICE), k, renorm)[0].cpu()[keep])


def test_nan_router_logits_stay_in_their_token():
    """One token's logits NaN / +inf: the other tokens keep their routing and finite outputs; the kernel's are
    bit-identical to a batch without the bad logits (each output row is its own token's; the CPU path's
    BLAS may block a different segment length differently, so its rows agree to fp32 rounding)."""
    e, k, t = 8, 2, 9
    w13, w2 = _weights(e, seed=21)
    g = torch.Generator().manual_seed(22)
    logits = torch.randn(t, e, generator=g)
    x = torch.randn(t, H, generator=g)
    clean = route(logits, k, True)
    for poison in (float("nan"), float("inf")):
        bad = logits.clone()
        bad[4] = poison
        bad[6, 3] = float("inf")  # one overflowing expert logit
        weights, ids = route(bad, k, True)
        keep = [i for i in range(t) if i not in (4, 6)]
        assert torch.equal(weights[keep], clean[0][keep]) and torch.equal(ids[keep], clean[1][keep])
        d = DEVICE
        for fn in (experts_reference, FM.fused_moe):
            want = fn(x.to(d), w13.to(d), w2.to(d), clean[0].to(d), clean[1].to(d))
            got = fn(x.to(d), w13.to(d), w2.to(d), weights.to(d), ids.to(d))
            assert got[keep].isfinite().all()
            if fn is FM.fused_moe:
                assert torch.equal(got[keep], want[keep])
            else:
                torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-6)


def test_refuses_unaligned_sizes_and_handles_empty_batch():
    w13, w2 = _weights(4, seed=1, h=40, inter=24)
    with pytest.raises(ValueError, match="multiples of 16"):
        FM.fused_moe(torch.zeros(2, 40), w13, w2, torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.int32))
    w13, w2 = _weights(4, seed=1)
    y = FM.fused_moe(torch.zeros(0, H, device=DEVICE), w13.to(DEVICE), w2.to(DEVICE),
                     torch.ones(0, 2, device=DEVICE), torch.zeros(0, 2, dtype=torch.int32, device=DEVICE))
    assert y.shape == (0, H)


def test_config_table_buckets():
    assert FM.moe_config(128, 768, 1).block_m == 16
    assert FM.moe_config(128, 768, 5000).block_m == 64
    assert FM.warm_up_sizes(128, 768, 100) == [1, 33]
    assert FM.warm_up_sizes(128, 768, 1) == [1]


@pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, "fp8"])
def test_gpu_real_shape_in_a_cuda_graph(dtype):
    """Qwen3-30B-A3B's expert shape (E=128, k=8, H=2048, I=768), compiled: decode-sized batches captured
    in a CUDA graph and replayed with new routing equal the eager call and the reference."""
    from pagedserve.quantization.fp8 import quantize_fp8_rows

    e, k, h, inter = 128, 8, 2048, 768
    w13, w2 = (w.cuda().bfloat16() for w in _weights(e, seed=1, h=h, inter=inter))
    scales = (None, None)
    if dtype == "fp8":
        (w13, s13), (w2, s2) = quantize_fp8_rows(w13), quantize_fp8_rows(w2)
        scales = (s13, s2)
    for t in (1, 8, 64):
        x = torch.randn(t, h, device="cuda").bfloat16()
        logits = torch.randn(t, e, device="cuda")
        weights, ids = route(logits, k, True)
        ref = experts_reference(x, w13, w2, weights, ids, *scales)
        out = FM.fused_moe(x, w13, w2, weights, ids, *scales)
        _close(out, ref, torch.bfloat16)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = FM.fused_moe(x, w13, w2, weights, ids, *scales)
        new_w, new_ids = route(torch.randn(t, e, device="cuda"), k, True)
        weights.copy_(new_w)
        ids.copy_(new_ids)
        graph.replay()
        _close(captured, experts_reference(x, w13, w2, weights, ids, *scales), torch.bfloat16)
