"""Triton paged-attention kernels against the torch reference backend.

On a CUDA machine the kernels run compiled; elsewhere they run on the CPU
through Triton's interpreter, set up by tests/triton_interp.py (TRITON_INTERPRET=1
only while this module imports the kernels and while each test here runs, or a
fresh interpreter process if triton was already imported without it).
Shapes are small so the interpreter finishes in seconds.
"""
from __future__ import annotations

import pytest
import torch

from pagedserve.model.attention_metadata import AttentionMetadata
from pagedserve.model.layers.attention import (
    TorchAttentionBackend,
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    write_kv,
)

from tests.triton_interp import DEVICE, ON_CUDA, import_kernels, interpreter_fixture, subprocess_test

TA, _NEEDS_SUBPROCESS = import_kernels("pagedserve.model.kernels.triton_attention", lambda m: m._INTERPRETED)
_interpret = interpreter_fixture(_NEEDS_SUBPROCESS)
test_in_subprocess = subprocess_test(__file__, _NEEDS_SUBPROCESS)


TOL = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _rand_cache(num_blocks, block_size, kvh, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(num_blocks, block_size, kvh, d, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(num_blocks, block_size, kvh, d, generator=g).to(dtype).to(DEVICE)
    return k, v


def _block_tables(seq_lens, block_size, num_blocks, seed=0, extra_cols=2):
    """Shuffled, non-contiguous physical blocks, distinct across sequences, padded with 0."""
    g = torch.Generator().manual_seed(seed + 1)
    need = [(s + block_size - 1) // block_size for s in seq_lens]
    width = max(need) + extra_cols
    perm = torch.randperm(num_blocks - 1, generator=g) + 1  # block 0 is the padding value
    assert sum(need) <= num_blocks - 1
    rows, i = [], 0
    for n in need:
        rows.append(perm[i:i + n].tolist() + [0] * (width - n))
        i += n
    return torch.tensor(rows, dtype=torch.int32, device=DEVICE)


def _close(out, ref, dtype):
    assert torch.isfinite(out).all()
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= TOL[dtype], f"max abs error {err} > {TOL[dtype]}"


# ---------------------------------------------------------------- KV write
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_matches_reference(dtype):
    t, kvh, d, bs, nb = 11, 3, 64, 4, 8
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(t, (3 + 2) * kvh * d, generator=g).to(dtype).to(DEVICE)
    # k and v as the model makes them: strided views of one fused projection
    _, k, v = qkv.split([3 * kvh * d, kvh * d, kvh * d], dim=-1)
    k, v = k.view(t, kvh, d), v.view(t, kvh, d)
    assert not v.is_contiguous()
    slots = (torch.randperm(nb * bs, generator=g)[:t]).to(DEVICE)
    kc, vc = _rand_cache(nb, bs, kvh, d, dtype, seed=4)
    kr, vr = kc.clone(), vc.clone()
    TA.write_kv_triton(k, v, kc, vc, slots)
    write_kv(k, v, kr, vr, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)


def test_write_kv_skips_negative_slots_and_casts():
    t, kvh, d, bs, nb = 4, 2, 32, 4, 4
    k = torch.randn(t, kvh, d, device=DEVICE)
    v = torch.randn(t, kvh, d, device=DEVICE)
    kc = torch.zeros(nb, bs, kvh, d, dtype=torch.bfloat16, device=DEVICE)
    vc = torch.zeros_like(kc)
    slots = torch.tensor([5, -1, 0, 15], device=DEVICE)
    TA.write_kv_triton(k, v, kc, vc, slots)
    flat_k, flat_v = kc.view(-1, kvh, d), vc.view(-1, kvh, d)
    # The GPU rounds fp32 -> bf16 to nearest even; Triton's interpreter truncates (one ulp off).
    rtol = 0 if ON_CUDA else 2 ** -7
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            torch.testing.assert_close(flat_k[s], k[i].bfloat16(), atol=0, rtol=rtol)
            torch.testing.assert_close(flat_v[s], v[i].bfloat16(), atol=0, rtol=rtol)
    written = torch.zeros(nb * bs, dtype=torch.bool)
    written[[5, 0, 15]] = True
    assert (flat_k[~written.to(DEVICE)] == 0).all()


# ---------------------------------------------------------------- decode
# Lengths: a single token, exactly one block, several blocks, not block-aligned, spanning tiles.
DECODE_LENS = [1, 4, 13, 8, 37, 3]


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 2, 32), (9, 3, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_matches_reference(heads, kv_heads, head_dim, dtype, num_splits):
    bs, nb = 4, 40
    kc, vc = _rand_cache(nb, bs, kv_heads, head_dim, dtype)
    lens = torch.tensor(DECODE_LENS, dtype=torch.int32, device=DEVICE)
    bt = _block_tables(DECODE_LENS, bs, nb)
    q = torch.randn(len(DECODE_LENS), heads, head_dim, generator=torch.Generator().manual_seed(5)).to(dtype).to(DEVICE)
    scale = head_dim ** -0.5
    ref = paged_decode_attention_ref(q.float(), kc.float(), vc.float(), bt, lens, scale)
    out = TA.paged_decode_attention_triton(q, kc, vc, bt, lens, scale, max(DECODE_LENS),
                                           num_splits=num_splits, block_n=16)
    assert out.dtype == dtype and out.shape == q.shape
    _close(out, ref, dtype)


@pytest.mark.parametrize("block_size,block_n", [(16, 16), (32, 16), (8, 32)])
def test_decode_split_k_long_context(block_size, block_n):
    """More splits than some sequences have tiles (empty splits), tiles smaller and larger than a block."""
    h, kvh, d = 9, 3, 64
    lens_l = [150, 17, 64, 1]
    nb = sum((s + block_size - 1) // block_size for s in lens_l) + 3
    kc, vc = _rand_cache(nb, block_size, kvh, d, torch.float16, seed=7)
    lens = torch.tensor(lens_l, dtype=torch.int32, device=DEVICE)
    bt = _block_tables(lens_l, block_size, nb, seed=7)
    q = torch.randn(len(lens_l), h, d, generator=torch.Generator().manual_seed(8)).half().to(DEVICE)
    ref = paged_decode_attention_ref(q.float(), kc.float(), vc.float(), bt, lens, 0.125)
    for splits in (2, 5):
        out = TA.paged_decode_attention_triton(q, kc, vc, bt, lens, 0.125, max(lens_l),
                                               num_splits=splits, block_n=block_n)
        _close(out, ref, torch.float16)


def test_decode_default_tiles_and_padding_row():
    """Default tile sizes and split heuristic; a padded row (seq_len 0) gives zeros, not NaN."""
    h, kvh, d, bs = 8, 2, 32, 16
    lens_l = [70, 0, 33]
    kc, vc = _rand_cache(12, bs, kvh, d, torch.float32, seed=9)
    lens = torch.tensor(lens_l, dtype=torch.int32, device=DEVICE)
    bt = _block_tables(lens_l, bs, 12, seed=9)
    q = torch.randn(3, h, d, device=DEVICE)
    ref = paged_decode_attention_ref(q, kc, vc, bt, lens, 0.2)
    for splits in (None, 1, 4):
        out = TA.paged_decode_attention_triton(q, kc, vc, bt, lens, 0.2, num_splits=splits)
        _close(out[[0, 2]], ref[[0, 2]], torch.float32)
        assert (out[1] == 0).all()


def test_choose_num_splits():
    cpu = torch.device("cpu")
    assert TA.choose_num_splits(256, 4, 4096, cpu) == 1  # enough programs already
    assert TA.choose_num_splits(1, 2, 100, cpu) == 1  # context too short to split
    s = TA.choose_num_splits(1, 2, 4096, cpu)
    assert 1 < s <= 64


# ---------------------------------------------------------------- prefill
def _prefill_case(heads, kv_heads, d, dtype, ctx, qlens, bs=4, seed=11):
    nb = sum((c + bs - 1) // bs for c in ctx) + 3
    kc, vc = _rand_cache(nb, bs, kv_heads, d, dtype, seed=seed)
    bt = _block_tables(ctx, bs, nb, seed=seed)
    qs = [0]
    for n in qlens:
        qs.append(qs[-1] + n)
    q = torch.randn(qs[-1], heads, d, generator=torch.Generator().manual_seed(seed + 2)).to(dtype).to(DEVICE)
    return q, kc, vc, bt, qs


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 2, 32), (9, 3, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prefix", [False, True])
def test_prefill_matches_reference(heads, kv_heads, head_dim, dtype, prefix):
    if prefix:  # chunks after a cached prefix; one 1-token chunk; one prefix not block-aligned
        ctx, qlens = [45, 21, 9, 16], [19, 1, 5, 16]
    else:  # whole prompts
        ctx = qlens = [37, 3, 16, 1]
    q, kc, vc, bt, qs = _prefill_case(heads, kv_heads, head_dim, dtype, ctx, qlens)
    scale = head_dim ** -0.5
    ref = paged_prefill_attention_ref(q.float(), kc.float(), vc.float(), bt, qs, ctx, scale)
    out = TA.paged_prefill_attention_triton(
        q, kc, vc, bt, torch.tensor(qs, dtype=torch.int32, device=DEVICE),
        torch.tensor(ctx, dtype=torch.int32, device=DEVICE), max(qlens), scale, block_m=16, block_n=16)
    assert out.dtype == dtype and out.shape == q.shape
    _close(out, ref, dtype)


def test_prefill_default_tiles_fp16():
    ctx, qlens = [100, 70], [100, 30]
    q, kc, vc, bt, qs = _prefill_case(8, 2, 32, torch.float16, ctx, qlens, bs=16, seed=21)
    ref = paged_prefill_attention_ref(q.float(), kc.float(), vc.float(), bt, qs, ctx, 0.17)
    out = TA.paged_prefill_attention_triton(
        q, kc, vc, bt, torch.tensor(qs, dtype=torch.int32, device=DEVICE),
        torch.tensor(ctx, dtype=torch.int32, device=DEVICE), max(qlens), 0.17)
    _close(out, ref, torch.float16)


# ---------------------------------------------------------------- backend
def _mixed_meta(decode_ctx, prefill_ctx, prefill_q, bs, nb, seed):
    """Metadata as the runner builds it: decodes first, then prefill chunks; one shared block pool."""
    all_ctx = decode_ctx + prefill_ctx
    bt_all = _block_tables(all_ctx, bs, nb, seed=seed)
    nd = len(decode_ctx)
    slots = []
    for i, c in enumerate(all_ctx):
        n = 1 if i < nd else prefill_q[i - nd]
        row = bt_all[i].tolist()
        slots.extend(row[p // bs] * bs + p % bs for p in range(c - n, c))
    qs = [0]
    for n in prefill_q:
        qs.append(qs[-1] + n)
    i32 = dict(dtype=torch.int32, device=DEVICE)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        num_decode=nd,
        decode_block_tables=bt_all[:nd] if nd else torch.zeros(1, 1, **i32),
        decode_seq_lens=torch.tensor(decode_ctx or [0], **i32),
        prefill_query_start=torch.tensor(qs, **i32),
        prefill_seq_lens=torch.tensor(prefill_ctx or [0], **i32),
        prefill_block_tables=bt_all[nd:] if prefill_ctx else torch.zeros(1, 1, **i32),
        decode_max_seq_len=max(decode_ctx, default=0),
        prefill_query_start_list=tuple(qs),
        prefill_seq_lens_list=tuple(prefill_ctx),
    )
    return meta, len(slots)


@pytest.mark.parametrize("case", ["mixed", "decode_only", "prefill_only"])
@pytest.mark.parametrize("num_splits", [None, 2])
def test_backend_forward(case, num_splits):
    h, kvh, d, bs, nb = 9, 3, 64, 16, 24
    decode_ctx = [] if case == "prefill_only" else [1, 16, 40]
    prefill_ctx, prefill_q = ([] , []) if case == "decode_only" else ([20, 50], [20, 18])
    meta, t = _mixed_meta(decode_ctx, prefill_ctx, prefill_q, bs, nb, seed=31)
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(32)
    q = torch.randn(t, h, d, generator=g).to(dtype).to(DEVICE)
    k = torch.randn(t, kvh, d, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(t, kvh, d, generator=g).to(dtype).to(DEVICE)
    kc, vc = _rand_cache(nb, bs, kvh, d, dtype, seed=33)
    kr, vr = kc.float(), vc.float()
    backend = TA.TritonAttentionBackend(decode_num_splits=num_splits)
    assert backend.name == "triton"
    out = backend.forward(q, k, v, kc, vc, meta, d ** -0.5)
    ref = TorchAttentionBackend().forward(q.float(), k.float(), v.float(), kr, vr, meta, d ** -0.5)
    assert torch.equal(kc.float(), kr) and torch.equal(vc.float(), vr)
    assert out.shape == q.shape and out.dtype == dtype
    _close(out, ref, dtype)


def test_get_attention_backend_on_cuda():
    if not ON_CUDA:
        pytest.skip("the triton backend is chosen automatically only on CUDA")
    from pagedserve.model.layers.attention import get_attention_backend

    assert get_attention_backend("auto", torch.device("cuda")).name == "triton"
