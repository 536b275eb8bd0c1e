"""The torch attention path's sliding window and soft-cap against attention written out per query.

The reference attends one query at a time over its sequence's keys in float64, with the window
rule spelled out (HF's Gemma 2 / Mistral: a query at position i sees keys j with i - W < j <= i).
"""
from __future__ import annotations

import pytest
import torch

from pagedserve.model.attention_metadata import AttentionMetadata
from pagedserve.model.layers.attention import TorchAttentionBackend, decode_plan, paged_decode_attention_ref, \
    paged_prefill_attention_ref

BS = 4


def _setup(ctx, seed=0, h=6, kvh=2, d=16):
    g = torch.Generator().manual_seed(seed)
    need = [(c + BS - 1) // BS for c in ctx]
    nb = sum(need) + 2
    kc = torch.randn(nb, BS, kvh, d, generator=g)
    vc = torch.randn(nb, BS, kvh, d, generator=g)
    perm = (torch.randperm(nb - 1, generator=g) + 1).tolist()
    width = max(need) + 1
    rows, i = [], 0
    for n in need:
        rows.append(perm[i:i + n] + [0] * (width - n))
        i += n
    return kc, vc, torch.tensor(rows, dtype=torch.int32)


def _brute(q, kc, vc, table, qpos, scale, window, softcap):
    """One query [H, D] at position qpos of the sequence whose blocks are `table`."""
    h, d = q.shape
    kvh = kc.shape[2]
    keys = [j for j in range(qpos + 1) if not window or j > qpos - window]
    k = torch.stack([kc[table[j // BS], j % BS] for j in keys]).double()  # [L, KVH, D]
    v = torch.stack([vc[table[j // BS], j % BS] for j in keys]).double()
    out = torch.empty(h, d, dtype=torch.float64)
    for head in range(h):
        kv = head // (h // kvh)
        s = (k[:, kv] @ q[head].double()) * scale
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        out[head] = torch.softmax(s, 0) @ v[:, kv]
    return out


@pytest.mark.parametrize("window,softcap", [(5, 0.0), (0, 2.0), (7, 1.5), (1, 0.0), (100, 0.0)])
def test_decode_window_softcap(window, softcap):
    lens = [1, 6, 13, 30, 9]
    kc, vc, bt = _setup(lens, seed=1)
    q = torch.randn(len(lens), 6, 16, generator=torch.Generator().manual_seed(2))
    sl = torch.tensor(lens, dtype=torch.int32)
    out = paged_decode_attention_ref(q, kc, vc, bt, sl, 0.3, max(lens), sliding_window=window, softcap=softcap)
    for i, n in enumerate(lens):
        ref = _brute(q[i], kc, vc, bt[i].tolist(), n - 1, 0.3, window, softcap)
        torch.testing.assert_close(out[i].double(), ref, atol=1e-5, rtol=1e-5)
    # grouped rows (host lengths given) take the same masks
    plan = decode_plan(bt, sl, max(lens), BS, q.dtype, seq_lens_list=lens, window=window)
    grouped = paged_decode_attention_ref(q, kc, vc, bt, sl, 0.3, max(lens), plan, window, softcap)
    torch.testing.assert_close(grouped, out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window,softcap", [(5, 0.0), (0, 2.0), (6, 1.5), (64, 0.0)])
def test_prefill_window_softcap(window, softcap):
    """Whole prompts and chunks after a cached prefix, the chunk starting inside and past the window."""
    ctx, qlens = [17, 21, 9, 3], [17, 4, 1, 3]
    kc, vc, bt = _setup(ctx, seed=3)
    qs = [0]
    for n in qlens:
        qs.append(qs[-1] + n)
    q = torch.randn(qs[-1], 6, 16, generator=torch.Generator().manual_seed(4))
    out = paged_prefill_attention_ref(q, kc, vc, bt, qs, ctx, 0.25, sliding_window=window, softcap=softcap)
    for i, c in enumerate(ctx):
        for j in range(qlens[i]):
            ref = _brute(q[qs[i] + j], kc, vc, bt[i].tolist(), c - qlens[i] + j, 0.25, window, softcap)
            torch.testing.assert_close(out[qs[i] + j].double(), ref, atol=1e-5, rtol=1e-5)


def test_window_as_long_as_the_sequence_is_global():
    ctx = [12, 7]
    kc, vc, bt = _setup(ctx, seed=5)
    q = torch.randn(19, 6, 16, generator=torch.Generator().manual_seed(6))
    glob = paged_prefill_attention_ref(q, kc, vc, bt, [0, 12, 19], ctx, 0.25)
    for w in (12, 4096):
        torch.testing.assert_close(paged_prefill_attention_ref(q, kc, vc, bt, [0, 12, 19], ctx, 0.25,
                                                               sliding_window=w), glob)
    assert not torch.allclose(paged_prefill_attention_ref(q, kc, vc, bt, [0, 12, 19], ctx, 0.25,
                                                          sliding_window=11), glob)


def test_backend_layers_with_and_without_window_share_a_step():
    """A global layer and a windowed / soft-capped one in the same step: each gets its own decode plan,
    and a batch that shares a long cached prefix (the shared-prefix path of global layers) still
    windows and caps correctly."""
    n, prefix, tail = 40, 40, [3, 5] * 20
    lens = [prefix + t for t in tail]
    g = torch.Generator().manual_seed(7)
    kvh, d = 2, 16
    shared = list(range(1, prefix // BS + 1))
    nb = 1 + len(shared) + n * 2
    kc, vc = torch.randn(nb, BS, kvh, d, generator=g), torch.randn(nb, BS, kvh, d, generator=g)
    rows = [shared + [len(shared) + 1 + 2 * i, len(shared) + 2 + 2 * i] for i in range(n)]
    bt = torch.tensor(rows, dtype=torch.int32)
    sl = torch.tensor(lens, dtype=torch.int32)
    slots = torch.tensor([rows[i][(c - 1) // BS] * BS + (c - 1) % BS for i, c in enumerate(lens)])
    meta = AttentionMetadata(slots, n, bt, sl, torch.zeros(1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
                             torch.zeros(0, 1, dtype=torch.int32), decode_max_seq_len=max(lens),
                             decode_seq_lens_list=tuple(lens))
    q = torch.randn(n, 6, d, generator=g)
    k, v = torch.randn(n, kvh, d, generator=g), torch.randn(n, kvh, d, generator=g)
    be = TorchAttentionBackend()
    glob = be.forward(q, k, v, kc, vc, meta, 0.25)
    assert any(type(p).__name__ == "SharedPrefix" for p in meta.derived.values())
    win = be.forward(q, k, v, kc, vc, meta, 0.25, sliding_window=6, softcap=3.0)
    capped = be.forward(q, k, v, kc, vc, meta, 0.25, softcap=3.0)
    for i in (0, 1, 17):
        for out, w, c in ((glob, 0, 0.0), (win, 6, 3.0), (capped, 0, 3.0)):
            ref = _brute(q[i], kc, vc, rows[i], lens[i] - 1, 0.25, w, c)
            torch.testing.assert_close(out[i].double(), ref, atol=1e-5, rtol=1e-5)
