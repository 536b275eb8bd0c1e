"""The mixture-of-experts layer: a softmax top-k router over E experts, each a SiLU-gated MLP.

Expert weights are stacked, w13 [E, 2I, H] (each expert's gate rows, then its up rows) and w2 [E, H, I],
so one kernel reads any expert by offset: on CUDA the fused Triton MoE (kernels/fused_moe.py), elsewhere
`experts_reference`, which the kernel tests also take as the truth. Routing is per token (row-wise
softmax and top-k, no batch-wide statistic), so a token whose router logits overflow or are NaN
changes its own output only.

`--quantization fp8` stores both stacks in e4m3 with one fp32 scale per output row (`quantize_fp8_`),
the per-channel scheme of the dense fp8 linears; the kernel converts the weight tiles back and applies
the scale to its accumulator (weight-only: the activations stay in the model's dtype).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.quantization.fp8_dtype import FP8


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights fp32 [T, k], expert ids int32 [T, k]): softmax in fp32, top-k,
    and the k weights rescaled to sum to one when `renormalize` (Qwen3-MoE's norm_topk_prob, Mixtral)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def _dequant(w: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    return w.to(dtype) if scale is None else (w.float() * scale.unsqueeze(-1)).to(dtype)


def experts_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor, w13_scale: torch.Tensor | None = None,
                      w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The experts' output for x [T, H] routed by (topk_weights, topk_ids) [T, k], in x's dtype.

    The T * k token slots are sorted by expert; each expert with slots runs its two GEMMs once over
    its contiguous segment (experts with no slots cost nothing), and the weighted slots are summed per
    token in fp32."""
    t, hidden = x.shape
    e, two_i, _ = w13.shape
    inter = two_i // 2
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1).long()
    order = torch.sort(flat, stable=True)[1]
    xs = x[order // k]
    out = torch.empty(t * k, hidden, dtype=torch.float32, device=x.device)
    counts = torch.bincount(flat, minlength=e).tolist()
    start = 0
    for expert, n in enumerate(counts):
        if n == 0:
            continue
        seg = xs[start:start + n]
        gate_up = F.linear(seg, _dequant(w13[expert], None if w13_scale is None else w13_scale[expert], x.dtype))
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        y = F.linear(h, _dequant(w2[expert], None if w2_scale is None else w2_scale[expert], x.dtype))
        out[order[start:start + n]] = y.float()
        start += n
    out *= topk_weights.reshape(-1, 1).float()
    return out.view(t, k, hidden).sum(1).to(x.dtype)


class RouterGate(nn.Linear):
    """The router's [E, H] projection. Its own type so the dense quantizers, which swap exact nn.Linear
    modules, leave it in the model's dtype: expert choice is sensitive to small logit changes."""


class FusedMoE(nn.Module):
    """Router + E stacked experts (+ an optional shared expert). forward(x [T, H]) -> [T, H].

    Parameter names follow HF's sparse MoE blocks where they can (`gate`, `shared_expert`,
    `shared_expert_gate`); the experts are the stacks `w13` / `w2` (`load_expert` fills them)."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool, shared_expert: nn.Module | None = None):
        """`shared_expert` (Qwen2-MoE): a dense MLP every token runs, scaled by sigmoid(shared_expert_gate(x))."""
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k {top_k} must be between 1 and num_experts {num_experts}")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.gate = RouterGate(hidden_size, num_experts, bias=False)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size), requires_grad=False)
        self.w13_scale: nn.Parameter | None = None
        self.w2_scale: nn.Parameter | None = None
        self.shared_expert = shared_expert
        self.shared_expert_gate = RouterGate(hidden_size, 1, bias=False) if shared_expert is not None else None

    @classmethod
    def from_shape(cls, moe, hidden_size: int, shared_expert: nn.Module | None = None) -> "FusedMoE":
        """From an hf_config.MoeShape."""
        return cls(moe.num_experts, moe.top_k, hidden_size, moe.intermediate_size, moe.renormalize, shared_expert)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        if x.is_cuda and self.top_k & (self.top_k - 1) == 0:  # one launch instead of ~6 torch ops
            from pagedserve.model.kernels import fused_moe

            weights, ids = fused_moe.route(logits, self.top_k, self.renormalize)
        else:
            weights, ids = route(logits, self.top_k, self.renormalize)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    def experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        args = (x, self.w13, self.w2, weights, ids, self.w13_scale, self.w2_scale)
        if x.is_cuda:
            from pagedserve.model.kernels import fused_moe

            if fused_moe.supported(self.hidden_size, self.intermediate_size):
                return fused_moe.fused_moe(*args)
        return experts_reference(*args)

    def warm_up(self, dtype: torch.dtype, max_tokens: int) -> int:
        """Compile the fused kernel's tile configs (one per token-count bucket) before serving and before
        CUDA-graph capture, so no compile lands in a timed batch; returns the calls made."""
        from pagedserve.model.kernels import fused_moe

        if not (self.w13.is_cuda and fused_moe.supported(self.hidden_size, self.intermediate_size)):
            return 0
        sizes = fused_moe.warm_up_sizes(self.num_experts, self.intermediate_size, max_tokens,
                                        self.w13_scale is not None)
        with torch.no_grad():
            for t in sizes:
                x = torch.zeros(t, self.hidden_size, dtype=dtype, device=self.w13.device)
                ids = torch.arange(t * self.top_k, device=x.device).remainder(self.num_experts)
                weights = torch.full((t, self.top_k), 1.0 / self.top_k, device=x.device)
                self.experts(x, weights, ids.view(t, self.top_k).to(torch.int32))
        return len(sizes)

    # -- weights ---------------------------------------------------------
    def load_expert(self, expert: int, proj: str, w: torch.Tensor) -> None:
        """One HF per-expert tensor into the stacks: proj gate_proj/w1 and up_proj/w3 ([I, H]) into w13's
        halves, down_proj/w2 ([H, I]) into w2."""
        inter = self.intermediate_size
        if proj in ("gate_proj", "w1"):
            dst = self.w13[expert, :inter]
        elif proj in ("up_proj", "w3"):
            dst = self.w13[expert, inter:]
        elif proj in ("down_proj", "w2"):
            dst = self.w2[expert]
        else:
            raise KeyError(proj)
        if tuple(w.shape) != tuple(dst.shape):
            raise ValueError(f"expert {expert} {proj}: checkpoint shape {tuple(w.shape)}, expected {tuple(dst.shape)}")
        with torch.no_grad():
            dst.copy_(w)

    def quantize_fp8_(self) -> None:
        """Both stacks to e4m3 with per-output-row fp32 scales (in place; the router stays as it is)."""
        from pagedserve.quantization.fp8 import quantize_fp8_rows

        for name in ("w13", "w2"):
            q, s = quantize_fp8_rows(getattr(self, name).data)
            setattr(self, name, nn.Parameter(q, requires_grad=False))
            setattr(self, f"{name}_scale", nn.Parameter(s, requires_grad=False))

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts every floating tensor: keep fp8 stacks and fp32 scales as stored.
        fp8 = self.w13.dtype == FP8
        super()._apply(fn, recurse)
        if fp8:
            for name in ("w13", "w2"):
                p = getattr(self, name)
                if p.dtype != FP8:
                    p.data = p.data.to(FP8)
                s = getattr(self, f"{name}_scale")
                if s.dtype != torch.float32:
                    s.data = s.data.float()
        return self

    def extra_repr(self) -> str:
        kind = "fp8 e4m3 per-channel" if self.w13_scale is not None else str(self.w13.dtype).replace("torch.", "")
        return (f"experts={self.num_experts}, top_k={self.top_k}, hidden={self.hidden_size}, "
                f"intermediate={self.intermediate_size}, renormalize={self.renormalize}, {kind}")
