"""What the decoder layers need of their linears: the input quant a W8A8 linear asks for, and
loading a checkpoint tensor into one part of a fused projection (qkv, gate_up)."""
from __future__ import annotations

import torch
from torch import nn

from pagedserve.errors import UnsupportedModelError
from pagedserve.model.kernels import fused_ops

# Where a fused projection's parts go for each tensor kind: (dim, offset divisor). nn.Linear weights
# and biases stack along dim 0; AWQ's [in, out] tensors along dim 1, packed ones at 8 values per int32.
_FUSE_DIM = {"qweight": (1, 8), "qzeros": (1, 8), "scales": (1, 1)}


def input_quant(linear: nn.Module, x: torch.Tensor) -> torch.dtype | None:
    """The 8-bit dtype `linear` quantizes x to per token (an fp8/int8 W8A8 linear on CUDA), or None. The
    norm before it then writes that form itself: one kernel fewer for qkv and gate_up. (SiLU-and-mul
    fused with the quant, one program a row, made decode 5-10% slower on an H200: a row's absmax needs
    the whole row, so one SM computed all 18944 SiLUs twice; down_proj keeps its own quant kernel.)"""
    ask = getattr(linear, "input_quant", None)
    return ask(x) if ask is not None and fused_ops.enabled(x) else None


def load_part(param: torch.Tensor, name: str, w: torch.Tensor, offset: int = 0, size: int | None = None) -> None:
    """Copy checkpoint tensor `name` into `param`, or into its output rows [offset, offset + size) when
    it is one part of a fused projection. AWQ tensors (qweight/qzeros/scales) are stored [in, out]: they
    fuse along dim 1, and the packed ones (8 int4 values per int32 column) at a 1/8 offset."""
    kind = name.rsplit(".", 1)[-1]
    dim, div = _FUSE_DIM.get(kind, (0, 1))
    if size is not None and (offset % div or size % div):
        raise UnsupportedModelError(
            f"checkpoint tensor {name!r}: a fused output slice of {size} is not a multiple of {div}")
    with torch.no_grad():
        dst = param if size is None else param.narrow(dim, offset // div, size // div)
        if kind == "weight_scale" and w.numel() == 1:  # fp8 per-tensor scale: one for every row
            w = w.reshape(()).expand(dst.shape)
        if tuple(dst.shape) != tuple(w.shape):
            raise UnsupportedModelError(
                f"checkpoint tensor {name!r} has shape {tuple(w.shape)}, expected {tuple(dst.shape)}")
        dst.copy_(w)
