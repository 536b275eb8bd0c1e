"""Decode attention over a shared cached prefix (model/layers/shared_prefix.py) equals the general paged path."""
from __future__ import annotations

import pytest
import torch

from pagedserve.model.layers.attention import TorchAttentionBackend, decode_plan, paged_decode_attention_ref
from pagedserve.model.attention_metadata import AttentionMetadata
from pagedserve.model.layers import shared_prefix
from pagedserve.model.layers.shared_prefix import MIN_SHARED_BLOCKS, plan_shared, shared_blocks, shared_prefix_decode

BS, KVH, D, H = 8, 2, 16, 6


@pytest.fixture(autouse=True)
def _always_share(monkeypatch):
    """Small cases here: take the shared path whenever rows share blocks (the size rule is tested below)."""
    monkeypatch.setattr(shared_prefix, "MIN_SAVED_BLOCKS", 0)


def _tables(g: torch.Generator, prefix_blocks: int, tails: list[int], nb: int = 256):
    perm = torch.randperm(nb - 1, generator=g)[: prefix_blocks + 8 * len(tails)] + 1
    rows, lens = [], []
    for i, t in enumerate(tails):
        own = perm[prefix_blocks + 8 * i: prefix_blocks + 8 * i + (t + BS - 1) // BS]
        rows.append(torch.cat([perm[:prefix_blocks], own]))
        lens.append(prefix_blocks * BS + t)
    bt = torch.zeros(len(tails), max(len(r) for r in rows) + 2, dtype=torch.int32)  # padded wider than needed
    for i, r in enumerate(rows):
        bt[i, :len(r)] = r
    return bt, torch.tensor(lens, dtype=torch.int32), lens


@pytest.mark.parametrize("tails", [[1, 9, 17, 3], [8, 8], [5, 30, 1, 12, 7]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_prefix_decode_matches_general_path(tails, dtype):
    g = torch.Generator().manual_seed(len(tails))
    kc = torch.randn(256, BS, KVH, D, generator=g).to(dtype)
    vc = torch.randn(256, BS, KVH, D, generator=g).to(dtype)
    bt, sl, sll = _tables(g, 6, tails)
    q = torch.randn(len(tails), H, D, generator=g).to(dtype)
    plan = plan_shared(bt, sl, sll, BS, dtype)
    assert plan is not None and plan.ids.numel() == 6
    ref = paged_decode_attention_ref(q, kc, vc, bt, sl, 0.25, max(sll))
    out = shared_prefix_decode(q, kc, vc, plan, 0.25)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def test_shared_blocks_stop_at_the_first_difference_and_keep_a_token_per_row():
    g = torch.Generator().manual_seed(0)
    bt, sl, sll = _tables(g, 6, [4, 4, 4])
    bt[2, 5] = 250  # third row diverges at block 5
    assert shared_blocks(bt, sll, BS) == 5
    # a row that ends exactly at the end of the shared blocks keeps its last block to itself
    assert shared_blocks(bt[:2], [6 * BS, 6 * BS + 3], BS) == 5
    assert shared_blocks(bt[:1], sll[:1], BS) == 0  # one row: nothing to share
    assert plan_shared(bt, sl, [MIN_SHARED_BLOCKS * BS] * 3, BS, torch.float32) is None  # too short to pay


def test_small_batches_keep_the_general_path(monkeypatch):
    monkeypatch.setattr(shared_prefix, "MIN_SAVED_BLOCKS", 128)
    g = torch.Generator().manual_seed(2)
    bt, sl, sll = _tables(g, 6, [4] * 3)
    assert plan_shared(bt, sl, sll, BS, torch.float32) is None  # 2 x 6 blocks saved: not worth it
    bt, sl, sll = _tables(g, 6, [4] * 30)
    assert plan_shared(bt, sl, sll, BS, torch.float32) is not None  # 29 x 6


def test_backend_uses_the_shared_path_and_gives_the_same_answer():
    g = torch.Generator().manual_seed(1)
    kc = torch.randn(256, BS, KVH, D, generator=g)
    vc = torch.randn(256, BS, KVH, D, generator=g)
    bt, sl, sll = _tables(g, 6, [3, 11, 6])
    n = len(sll)
    q = torch.randn(n, H, D, generator=g)
    k, v = torch.randn(n, KVH, D, generator=g), torch.randn(n, KVH, D, generator=g)
    slots = torch.tensor([int(bt[i, (sll[i] - 1) // BS]) * BS + (sll[i] - 1) % BS for i in range(n)])
    meta = AttentionMetadata(slot_mapping=slots, num_decode=n, decode_block_tables=bt, decode_seq_lens=sl,
                             prefill_query_start=torch.zeros(1, dtype=torch.int32),
                             prefill_seq_lens=torch.zeros(1, dtype=torch.int32),
                             prefill_block_tables=torch.zeros(1, 1, dtype=torch.int32),
                             decode_max_seq_len=max(sll), decode_seq_lens_list=tuple(sll))
    out = TorchAttentionBackend().forward(q, k, v, kc.clone(), vc.clone(), meta, 0.25)
    assert any(type(p).__name__ == "SharedPrefix" for p in meta.derived.values())
    kc2, vc2 = kc.clone(), vc.clone()
    kc2.view(-1, KVH, D)[slots], vc2.view(-1, KVH, D)[slots] = k, v
    ref = paged_decode_attention_ref(q, kc2, vc2, bt, sl, 0.25, max(sll), decode_plan(bt, sl, max(sll), BS, q.dtype))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
