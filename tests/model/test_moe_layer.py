"""The MoE layer's CPU path (layers/moe.py) against transformers' own sparse MoE blocks on the same weights."""
from __future__ import annotations

import pytest
import torch

from pagedserve.quantization.fp8_dtype import FP8
from pagedserve.model.layers.moe import FusedMoE, RouterGate, experts_reference, route


def _hf_block(kind: str, e: int, k: int, norm: bool):
    from transformers import MixtralConfig, Qwen3MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    torch.manual_seed(0)
    if kind == "qwen3_moe":
        cfg = Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=48, num_experts=e, num_experts_per_tok=k,
                             norm_topk_prob=norm)
        block = Qwen3MoeSparseMoeBlock(cfg)
    else:
        cfg = MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=e, num_experts_per_tok=k)
        block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    return block.eval()


def _ours_from(block, e: int, k: int, norm: bool) -> FusedMoE:
    """Our layer loaded through `load_expert` from HF's per-expert [I, H] / [H, I] slices."""
    moe = FusedMoE(e, k, 32, 48, norm)
    with torch.no_grad():
        moe.gate.weight.copy_(block.gate.weight)
    gate_up, down = block.experts.gate_up_proj, block.experts.down_proj
    for i in range(e):
        moe.load_expert(i, "gate_proj", gate_up[i, :48])
        moe.load_expert(i, "w3", gate_up[i, 48:])
        moe.load_expert(i, "down_proj", down[i])
    return moe


@pytest.mark.parametrize("kind,e,k,norm", [("qwen3_moe", 8, 2, True), ("qwen3_moe", 6, 3, False),
                                           ("mixtral", 4, 2, True)])
def test_layer_matches_hf_block(kind, e, k, norm):
    block = _hf_block(kind, e, k, norm)
    moe = _ours_from(block, e, k, norm)
    x = torch.randn(1, 23, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = block(x)
        want = want[0] if isinstance(want, tuple) else want
        got = moe(x[0])
    torch.testing.assert_close(got, want[0], rtol=1e-5, atol=1e-5)


def test_reference_equals_per_token_loop():
    """experts_reference (sorted segments) equals the definition, token by token."""
    e, k, h, inter, t = 5, 2, 16, 24, 13
    g = torch.Generator().manual_seed(3)
    w13, w2 = torch.randn(e, 2 * inter, h, generator=g), torch.randn(e, h, inter, generator=g)
    x = torch.randn(t, h, generator=g)
    weights, ids = route(torch.randn(t, e, generator=g), k, False)
    ids[:, 0] = 4  # expert 4 on every token; some experts idle
    want = torch.zeros(t, h)
    for i in range(t):
        for j in range(k):
            a = w13[ids[i, j]] @ x[i]
            want[i] += weights[i, j] * (w2[ids[i, j]] @ (torch.nn.functional.silu(a[:inter]) * a[inter:]))
    torch.testing.assert_close(experts_reference(x, w13, w2, weights, ids), want, rtol=1e-5, atol=1e-5)


def test_route_renormalizes_and_keeps_order():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    w, ids = route(logits, 2, False)
    assert ids.tolist() == [[1, 2]] and ids.dtype == torch.int32
    p = torch.softmax(logits, -1)[0]
    torch.testing.assert_close(w[0], p[[1, 2]])
    w, _ = route(logits, 2, True)
    torch.testing.assert_close(w.sum(-1), torch.ones(1))


def test_fp8_quantize_keeps_router_and_survives_dtype_moves():
    block = _hf_block("qwen3_moe", 8, 2, True)
    moe = _ours_from(block, 8, 2, True)
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dense = moe(x)
    moe.quantize_fp8_()
    moe.to(torch.bfloat16)
    assert moe.w13.dtype == FP8 and moe.w2.dtype == FP8 and moe.w13_scale.dtype == torch.float32
    assert moe.w13_scale.shape == (8, 96) and moe.w2_scale.shape == (8, 32)
    assert isinstance(moe.gate, RouterGate) and moe.gate.weight.dtype == torch.bfloat16
    with torch.no_grad():
        got = moe(x.bfloat16()).float()
    assert ((got - dense).norm() / dense.norm()).item() < 0.08
    assert "fp8" in repr(moe)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="top_k"):
        FusedMoE(4, 5, 16, 16, True)
    moe = FusedMoE(4, 2, 16, 24, True)
    with pytest.raises(ValueError, match="expected"):
        moe.load_expert(0, "gate_proj", torch.zeros(16, 24))


def test_tensor_parallel_slices_sum_to_the_full_layer():
    """Every expert's intermediate dimension split over 3 ranks (unevenly: 48 = 16 + 16 + 16, shared 40 =
    14 + 13 + 13): the ranks' outputs, summed as the all-reduce sums them, equal the unsplit layer."""
    from pagedserve.distributed.partition import plan_shards
    from pagedserve.model.hf_config import MoeShape

    moe = MoeShape(6, 3, 48, False, (0,), 40)
    g = torch.Generator().manual_seed(4)
    full = FusedMoE(6, 3, 32, 48, False)
    with torch.no_grad():
        for p in full.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    gu, down = torch.randn(80, 32, generator=g), torch.randn(32, 40, generator=g)
    x = torch.randn(9, 32, generator=g)

    def shared_out(gate_up, dn, h):
        a = h @ gate_up.t()
        return (torch.nn.functional.silu(a[:, :a.shape[1] // 2]) * a[:, a.shape[1] // 2:]) @ dn.t()

    with torch.no_grad():
        want = full(x) + shared_out(gu, down, x)
        total = torch.zeros_like(want)
        for s in plan_shards(6, 3, 16, 64, 384, 3, moe):
            part = FusedMoE(6, 3, 32, s.expert_count, False)
            part.gate.weight.copy_(full.gate.weight)
            part.w13.copy_(s.shard_fused_tensor("layers.0.mlp.w13", full.w13, 0, 0, 0))
            part.w2.copy_(s.shard_fused_tensor("layers.0.mlp.w2", full.w2, 0, 0, 0))
            sgu = s.shard_fused_tensor("layers.0.mlp.shared_expert.gate_up_proj.weight", gu, 0, 0, 0)
            sdn = s.shard_hf_tensor("layers.0.mlp.shared_expert.down_proj.weight", down)
            assert sgu.shape == (2 * s.shared_count, 32) and sdn.shape == (32, s.shared_count)
            # HF's per-expert tensors slice to the same rows as the stacks
            assert torch.equal(s.shard_hf_tensor("layers.0.mlp.experts.2.gate_proj.weight", full.w13[2, :48]),
                               part.w13[2, :s.expert_count])
            assert torch.equal(s.shard_hf_tensor("layers.0.block_sparse_moe.experts.2.w2.weight", full.w2[2]),
                               part.w2[2])
            total += part(x) + shared_out(sgu, sdn, x)
    torch.testing.assert_close(total, want, rtol=1e-4, atol=1e-4)
