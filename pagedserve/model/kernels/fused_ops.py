"""Fused elementwise ops of the decoder layer, each with a torch reference.

Eager PyTorch runs a bf16 RMSNorm as ~7 kernels, RoPE as ~6, SiLU-and-mul as
2; at batch-1 decode these launches, not the matmuls, keep a CUDA-graph step
well below the memory-bandwidth bound. The Triton versions
(`pagedserve.model.kernels.fused_kernels`) do each op in one kernel with one read and
one write per tensor, rounding to the model dtype where Hugging Face's eager
code rounds, so outputs match the reference:

* rms_norm, add_rms_norm, silu_mul: bit-identical in fp16/bf16 except where
  the fp32 rsqrt/exp or the sum order differ in the last bit before the final
  rounding, then 1 ulp of the dtype (rare); fp32 within ~1e-6 relative.
* rope_: computed in fp32 and rounded once, where the reference rounds each
  of its three ops, so bf16 may differ by 1-2 ulp; fp32 within ~1e-6.

Dispatch: the Triton kernel when the tensor is on CUDA and triton imports,
or on the CPU when TRITON_INTERPRET=1 (tests); otherwise the reference. None
of the functions syncs with the host or branches on tensor values, and none
allocates more than its outputs, so they can be captured in CUDA graphs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

_kernels: ModuleType | None | bool = None  # None: not tried yet; False: triton unavailable

# The model layers call these ops on CUDA (one kernel each instead of ~20 small eager kernels per
# layer) and their own eager code elsewhere. PAGEDSERVE_FUSED_OPS=0 turns that off (A/B runs).
ENABLED = os.environ.get("PAGEDSERVE_FUSED_OPS", "1") != "0"


def enabled(x: torch.Tensor) -> bool:
    """Whether a layer should route x through these ops (read per call: benchmarks flip ENABLED)."""
    return ENABLED and x.is_cuda


def _load_kernels() -> ModuleType | None:
    global _kernels
    if _kernels is None:
        try:
            from pagedserve.model.kernels import fused_kernels
        except ImportError:  # triton missing or unsupported on this platform
            _kernels = False
        else:
            _kernels = fused_kernels
    return _kernels or None


def _triton_for(x: torch.Tensor) -> ModuleType | None:
    """The kernel module if x should go through Triton, else None (use the reference).

    Triton is imported lazily: a CPU-only process never imports it unless
    TRITON_INTERPRET=1 is set, so it cannot poison a later interpreted import.
    """
    if x.is_cuda:
        k = _load_kernels()
        return k if k is not None and not k.INTERPRETED else None
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        k = _load_kernels()
        return k if k is not None and k.INTERPRETED else None
    return None


@dataclass
class QuantizedActivation:
    """An activation already quantized per token for a W8A8 linear (fp8/int8 Fp8Linear or Int8Linear on
    CUDA), as written by a norm kernel asked for `quant`: the linear skips its own quant kernel. Only
    those linears accept it; a caller asks for it only when the linear's `input_quant` says it will
    quantize this input itself."""
    q: torch.Tensor  # [T, K] float8_e4m3fn or int8
    scale: torch.Tensor  # [T, 1] fp32: row t ~= q[t] * scale[t]
    dtype: torch.dtype  # the activation's own dtype, which the linear's output takes


def _check_last_dim(name: str, x: torch.Tensor, size: int) -> None:
    if x.shape[-1] != size:
        raise ValueError(f"{name} has last dimension {x.shape[-1]}, expected {size}")


# --------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face LlamaRMSNorm: normalise in fp32, round to x.dtype, then times the weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _quant_ok(x: torch.Tensor, out_dtype: torch.dtype, quant: torch.dtype | None) -> bool:
    """Emit a quantized output (on the Triton path): asked for, and the output keeps x's dtype."""
    return quant is not None and out_dtype == x.dtype


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             quant: torch.dtype | None = None) -> torch.Tensor | QuantizedActivation:
    """x [..., H], weight [H] -> y [..., H] in promote_types(x.dtype, weight.dtype) (as HF).

    quant (float8_e4m3fn / int8): return y quantized per token as a QuantizedActivation [T, H] where the
    Triton kernel runs (bit-identical to quantizing y afterwards); elsewhere y itself."""
    _check_last_dim("weight", x, weight.shape[-1])
    k = _triton_for(x)
    if k is None:
        return rms_norm_ref(x, weight, eps)
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    if _quant_ok(x, out_dtype, quant):
        return QuantizedActivation(*k.rms_norm_triton(x, weight, eps, out_dtype, quant), x.dtype)
    return k.rms_norm_triton(x, weight, eps, out_dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                     inplace: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    new_residual = residual.add_(x) if inplace else residual + x
    return rms_norm_ref(new_residual, weight, eps), new_residual


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 inplace: bool = True, quant: torch.dtype | None = None
                 ) -> tuple[torch.Tensor | QuantizedActivation, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass over x and residual.

    The sum is rounded to the model dtype before the norm (HF adds the residual
    in the model dtype). With inplace=True (default) the sum overwrites
    `residual` and that same tensor is returned as new_residual: no extra
    allocation, but the caller's residual changes. x and residual must have
    the same shape and dtype. `quant`: as in rms_norm.
    """
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype} and residual {tuple(residual.shape)} "
                         f"{residual.dtype} must have the same shape and dtype")
    _check_last_dim("weight", x, weight.shape[-1])
    k = _triton_for(x)
    if k is None:
        return add_rms_norm_ref(x, residual, weight, eps, inplace)
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    quant = quant if _quant_ok(x, out_dtype, quant) else None
    rows = _row_view(residual)
    if inplace and rows is not None:
        y = k.add_rms_norm_triton(x, residual, weight, eps, out_dtype, residual, quant)
        new_residual = residual
    else:
        new_residual = torch.empty(residual.shape, dtype=residual.dtype, device=residual.device)
        y = k.add_rms_norm_triton(x, residual if rows is not None else residual.contiguous(), weight, eps,
                                  out_dtype, new_residual, quant)
        if inplace:  # residual is not a [rows, H] view with unit stride: rare, costs a copy
            new_residual = residual.copy_(new_residual)
    return (QuantizedActivation(*y, x.dtype) if quant else y), new_residual


def _row_view(t: torch.Tensor) -> torch.Tensor | None:
    """t as [rows, H] with unit stride along H without a copy (the kernel writes through it), or None."""
    try:
        v = t.view(-1, t.shape[-1])
    except RuntimeError:
        return None
    return v if v.stride(-1) == 1 or v.shape[-1] == 1 else None


# --------------------------------------------------------------------------
# SiLU and mul
# --------------------------------------------------------------------------
def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2I] (gate first, up second) -> silu(gate) * up [..., I]."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dimension {gate_up.shape[-1]} must be even")
    k = _triton_for(gate_up)
    if k is None:
        return silu_mul_ref(gate_up)
    return k.silu_mul_triton(gate_up)


# --------------------------------------------------------------------------
# Rotary embedding
# --------------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope_tables(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin as [T, D] (accepts [T, 1, D]) after checking their shapes against qk."""
    if qk.dim() != 3:
        raise ValueError(f"qk must be [T, heads, head_dim], got shape {tuple(qk.shape)}")
    t, _, d = qk.shape
    if d % 2:
        raise ValueError(f"head_dim {d} must be even for rotate_half RoPE")
    tabs = []
    for name, c in (("cos", cos), ("sin", sin)):
        if c.dim() == 3 and c.shape[1] == 1:
            c = c[:, 0]
        if c.shape != (t, d):
            raise ValueError(f"{name} must be [T, head_dim] = [{t}, {d}] or [T, 1, head_dim], "
                             f"got {tuple(c.shape)}")
        tabs.append(c)
    return tabs[0], tabs[1]


def rope_ref_(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF apply_rotary_pos_emb on [T, heads, D], written back into qk."""
    cos, sin = _rope_tables(qk, cos, sin)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return qk.copy_(qk * cos + _rotate_half(qk) * sin)


def rope_(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate qk [T, heads, D] in place (NeoX/HF rotate_half style); returns qk.

    qk may be a strided view (q and k heads sliced from the fused qkv output)
    as long as head_dim is contiguous. cos/sin: [T, D] or [T, 1, D], one row
    per token, usually in the model dtype.
    """
    cos, sin = _rope_tables(qk, cos, sin)
    k = _triton_for(qk)
    if k is None or qk.stride(-1) != 1:
        return rope_ref_(qk, cos, sin)
    if cos.stride(-1) != 1:
        cos = cos.contiguous()
    if sin.stride(-1) != 1:
        sin = sin.contiguous()
    return k.rope_triton(qk, cos, sin)
