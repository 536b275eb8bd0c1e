"""Quantized linears: int8 (quantized on load) and AWQ int4 (pre-quantized checkpoints).

* ``int8``: after the dense weights are loaded, `quantize_model` swaps every plain ``nn.Linear`` of
  the transformer blocks for an `Int8Linear`: symmetric round-to-nearest, one scale per output
  channel (row), scale = max|w_row| / 127.
* ``awq``: the checkpoint already holds int4 weights (AWQ GEMM layout, see awq_format.py); the model
  is built with `AWQLinear` projections (`awq_linear_factory`) and the loader fills qweight/qzeros/scales.

The embedding and the LM head stay in the compute dtype, as in vLLM: they are a small part of a 7B
model's weights, and the logits are the most quantization-sensitive matmul. Quantized tensors are
parameters (requires_grad=False), so parameter-byte counts (the startup log) see their real size.

Forward: on CUDA, int8 is W8A8 at every batch size (per-token int8 activations on the int8 tensor
cores, triton_w8a8.py; int8_w8a8.py is its arithmetic); AWQ dequantizes int4 tiles in registers
(triton_quant.py, after repacking to its K-strided layout on the GPU) up to a measured batch size and
then switches to dequantize-to-bf16 + cuBLAS
(dispatch.py says where). On CPU, int8 and AWQ stay weight-only,
dequantize-per-call: the int weight is converted to the activation dtype and handed to F.linear
(AWQ in bounded K chunks), so no dense copy is kept between calls. Trade-off: CPU memory shrinks,
CPU speed does not improve (the dense fp32 path also gets oneDNN's packed GEMM, these do not).
torch's `_weight_int8pack_mm` gives the same numbers but ran 5-30x slower than this on our 2-core
AMD CPU (M = 1..256), so it is not used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.errors import ConfigError, UnsupportedModelError
from pagedserve.model.kernels.fused_ops import QuantizedActivation

METHODS = ("int8", "awq", "fp8")
_DENSE_CHUNK = 1 << 24  # elements of dequantized weight held at once by the CPU AWQ path


def _on_gpu(x: torch.Tensor) -> bool:
    return x.device.type == "cuda"


class Int8Linear(nn.Module):
    """nn.Linear with an int8 weight [out, in] and one scale per output channel (weight-only)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=torch.float32,
                 device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.scale = nn.Parameter(torch.ones(out_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device)
        q, s = quantize_int8(w)
        with torch.no_grad():
            m.weight.copy_(q)
            m.scale.copy_(s)
            if linear.bias is not None:
                m.bias.copy_(linear.bias.detach())
        return m

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(dtype) * self.scale.to(dtype).unsqueeze(1)

    def input_quant(self, x: torch.Tensor) -> torch.dtype | None:
        """int8 when forward would quantize x per token (the W8A8 path): see Fp8Linear.input_quant."""
        if not _on_gpu(x):
            return None
        from pagedserve.quantization.triton_w8a8 import int8_mma_available, w8a8_supported

        ok = w8a8_supported(self.out_features, self.in_features) and int8_mma_available(x.device.index)
        return torch.int8 if ok else None

    def forward(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        if isinstance(x, QuantizedActivation):  # only handed over when input_quant said int8
            from pagedserve.quantization.triton_w8a8 import w8a8_gemm

            return w8a8_gemm(x.q, x.scale, self.weight, self.scale, self.bias, x.dtype)
        if self.input_quant(x) is not None:
            from pagedserve.quantization.triton_w8a8 import w8a8_linear

            return w8a8_linear(x, self.weight, self.scale, self.bias)
        # The scale is constant along K: apply it to the output, not to a dense weight copy.
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: returns (q int8 [N, K], scale [N]) with w ~= q * scale[:, None]."""
    wf = w.float()
    scale = (wf.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(wf / scale.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(w.dtype)


class AWQLinear(nn.Module):
    """Linear over an AWQ GEMM-format int4 weight: qweight [in, out/8], qzeros [in/G, out/8], scales [in/G, out].

    Scales are kept in the model's compute dtype (fp16 in the file; bf16 on a bf16 GPU engine, which
    costs <0.4% relative scale precision, far below the int4 step)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 128,
                 dtype=None, device=None):
        super().__init__()
        if out_features % 8:
            raise UnsupportedModelError(f"AWQ needs out_features divisible by 8, got {out_features}")
        if in_features % group_size:
            raise UnsupportedModelError(
                f"AWQ group_size {group_size} does not divide in_features {in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.qweight = nn.Parameter(torch.zeros(in_features, out_features // 8, dtype=torch.int32, device=device),
                                    requires_grad=False)
        self.qzeros = nn.Parameter(torch.zeros(groups, out_features // 8, dtype=torch.int32, device=device),
                                   requires_grad=False)
        self.scales = nn.Parameter(torch.ones(groups, out_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    kstrided = False  # qweight/qzeros hold the GPU kernels' layout (to_kstrided), not the checkpoint's

    def to_kstrided(self) -> bool:
        """Repack qweight/qzeros into the K-strided layout the GPU kernels read (triton_quant; the same int4
        bytes). Needs in_features % 128 == 0; returns whether the module now holds that layout."""
        from pagedserve.quantization.awq_format import KBLOCK, to_kstrided

        if not self.kstrided and self.in_features % KBLOCK == 0 and self.group_size % 16 == 0:
            qw, z = to_kstrided(self.qweight.data, self.qzeros.data)
            self.qweight = nn.Parameter(qw, requires_grad=False)
            self.qzeros = nn.Parameter(z, requires_grad=False)
            self.kstrided = True
        return self.kstrided

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from pagedserve.quantization.awq_format import dequantize, dequantize_kstrided

        if self.kstrided:
            return dequantize_kstrided(self.qweight, self.qzeros, self.scales, dtype)
        return dequantize(self.qweight, self.qzeros, self.scales, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kstrided:
            if not _on_gpu(x):  # moved off the GPU after repacking: correct, not fast
                return F.linear(x, self.dequantized(x.dtype), self.bias)
            from pagedserve.quantization.dispatch import use_dense
            from pagedserve.quantization.triton_quant import awq_linear, awq_linear_dense

            if use_dense("awq", x.numel() // self.in_features, self.out_features, self.in_features):
                return awq_linear_dense(x, self.qweight, self.qzeros, self.scales, self.bias)
            return awq_linear(x, self.qweight, self.qzeros, self.scales, self.bias)
        return self._forward_reference(x)  # the CPU; a GPU only for in_features not a multiple of 128

    def _forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Unpack -> (q - z) * s -> F.linear, over K chunks of whole groups so the dense temporary stays bounded."""
        from pagedserve.quantization.awq_format import unpack_int4

        g = self.group_size
        rows = max(g, _DENSE_CHUNK // self.out_features // g * g)
        y = None
        for k0 in range(0, self.in_features, rows):
            k1 = min(k0 + rows, self.in_features)
            q = unpack_int4(self.qweight[k0:k1])  # [k, N]
            z = unpack_int4(self.qzeros[k0 // g:k1 // g]).repeat_interleave(g, dim=0)
            s = self.scales[k0 // g:k1 // g].to(x.dtype).repeat_interleave(g, dim=0)
            w = (q - z).to(x.dtype).mul_(s)  # [k, N]: x[:, k] @ w
            part = torch.matmul(x[..., k0:k1], w)
            y = part if y is None else y.add_(part)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 AWQ group_size={self.group_size}")


# -- configuration ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class AWQConfig:
    group_size: int

    @classmethod
    def from_hf(cls, qc: dict) -> "AWQConfig":
        """Validate an HF `quantization_config` of an AWQ checkpoint; refuse what the kernels do not implement."""
        bits = qc.get("bits", qc.get("w_bit"))
        group = qc.get("group_size", qc.get("q_group_size"))
        version = str(qc.get("version", "gemm")).lower()
        if bits != 4:
            raise UnsupportedModelError(f"AWQ checkpoint has bits={bits}; only 4-bit AWQ is supported")
        if not qc.get("zero_point", True):
            raise UnsupportedModelError("AWQ checkpoint has zero_point=false; only zero-point AWQ is supported")
        if version != "gemm":
            raise UnsupportedModelError(
                f"AWQ checkpoint version {version!r} is not supported; only the GEMM packing (version 'gemm')")
        if not isinstance(group, int) or group <= 0 or group % 16:
            raise UnsupportedModelError(
                f"AWQ group_size {group!r} is not supported; use a positive multiple of 16 (e.g. 64 or 128)")
        if group > 64 and group % 64:
            raise UnsupportedModelError(f"AWQ group_size {group} above 64 must be a multiple of 64")
        if qc.get("modules_to_not_convert"):
            raise UnsupportedModelError(
                f"AWQ checkpoint leaves modules unquantized ({qc['modules_to_not_convert']}); not supported yet")
        return cls(group_size=group)


def resolve_quantization(requested: str | None, hf_config: dict) -> str | None:
    """The method to use given --quantization and the checkpoint's own `quantization_config`."""
    from pagedserve.quantization.fp8_format import Fp8CheckpointConfig, is_fp8_config

    requested = None if requested in (None, "none") else requested
    qc = hf_config.get("quantization_config")
    ckpt = str(qc.get("quant_method", "")).lower() if isinstance(qc, dict) else None
    if ckpt and is_fp8_config(qc):
        if requested not in (None, "fp8"):
            raise ConfigError(f"--quantization {requested} conflicts with this fp8 checkpoint", param="quantization",
                              hint="drop --quantization or pass --quantization fp8")
        Fp8CheckpointConfig.from_hf(qc)
        return "fp8"
    if ckpt and ckpt != "awq":
        raise UnsupportedModelError(
            f"the checkpoint is quantized with {ckpt!r}, which pagedserve cannot load; "
            "supported: AWQ int4 and fp8 (vLLM / llm-compressor) checkpoints, or a bf16/fp32 checkpoint "
            "with --quantization int8 or fp8")
    if ckpt == "awq":
        if requested not in (None, "awq"):
            raise ConfigError(f"--quantization {requested} conflicts with this AWQ checkpoint", param="quantization",
                              hint="drop --quantization or pass --quantization awq")
        AWQConfig.from_hf(qc)
        return "awq"
    if requested == "awq":
        raise ConfigError("--quantization awq needs a pre-quantized AWQ checkpoint (config.json "
                          "quantization_config with quant_method 'awq')", param="quantization",
                          hint="use an AWQ model, or --quantization int8 to quantize this one on load")
    return requested


def is_prequantized_fp8(hf_config: dict) -> bool:
    from pagedserve.quantization.fp8_format import is_fp8_config

    return is_fp8_config(hf_config.get("quantization_config"))


def awq_linear_factory(hf_config: dict):
    """A `make_linear(in, out, bias)` that builds AWQLinear projections for this checkpoint."""
    cfg = AWQConfig.from_hf(hf_config["quantization_config"])

    def make(in_features: int, out_features: int, bias: bool = False) -> AWQLinear:
        return AWQLinear(in_features, out_features, bias, cfg.group_size, dtype=torch.get_default_dtype())

    return make


def prepare_awq_for_gpu(model: nn.Module) -> tuple[int, int]:
    """Repack every AWQ linear for the GPU kernels; returns (repacked, left in the checkpoint layout)."""
    mods = [m for m in model.modules() if isinstance(m, AWQLinear)]
    done = sum(m.to_kstrided() for m in mods)
    return done, len(mods) - done


def quantize_model(model: nn.Module, method: str) -> int:
    """Swap the model's plain nn.Linear modules (the block projections) for quantized ones; returns how many.

    The LM head (`model.lm_head`) stays dense. "int8" and "fp8" quantize after loading; AWQ models
    (and pre-quantized fp8 checkpoints) are built quantized."""
    if method == "fp8":
        from pagedserve.quantization.fp8 import Fp8Linear

        make = Fp8Linear.from_linear
    elif method == "int8":
        make = Int8Linear.from_linear
    else:
        raise ValueError(f"quantize_model handles int8 and fp8 only, got {method!r}")
    head = getattr(model, "lm_head", None)
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Linear and child is not head]
    for parent, name, child in swaps:
        setattr(parent, name, make(child))
    return len(swaps)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters as stored (int8/int4 buffers at their real size)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
