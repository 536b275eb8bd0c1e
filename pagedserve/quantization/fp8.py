"""FP8 (float8_e4m3fn) linears: per-output-channel weight scales, per-token dynamic activation scales.

W8A8 in fp8, vLLM's `--quantization fp8` scheme:
* weights: q_w[n, :] = clamp(w[n, :] / s_w[n]) in e4m3, s_w[n] = max|w[n, :]| / 448 (one fp32 scale a row);
* activations: each token row is quantized on the fly the same way, s_x[m] = max|x[m, :]| / 448;
* y = (q_x @ q_w^T) * s_x[:, None] * s_w[None, :], accumulated in fp32 with both scales applied in the
  GEMM's epilogue: our Triton W8A8 kernel (triton_w8a8.py) at most batch sizes, torch's rowwise
  `_scaled_mm` where quantization/dispatch.py measured it faster (M in FP8_SCALED_MM_M).
* Decode (M = 1..16) is bound by weight bytes, which fp8 halves: 1.42x bf16 summed over a 7B layer's
  GEMMs at M=1 on an H200 (the weight-only kernel that used to serve small M reached 0.96x).

FP8 tensor cores exist from compute capability 8.9 (Ada) on; Hopper (9.0) is the target. vLLM allows 8.9,
so do we; older GPUs and the CPU are refused in one line (`check_fp8_device`). The math itself
(`fp8_linear_reference`) runs anywhere: it is what the CPU tests and the quality benchmark check.

The per-token quantization of the activation is one Triton kernel on the GPU
(triton_w8a8.per_token_quant), with no host sync, so it can be captured in a CUDA graph. `_scaled_mm`
wants K and N multiples of 16 and the weight column-major: we keep W row-major [N, K] and pass W.t(),
which is exactly that (and the K-major operand the Triton kernel wants too).
"""
from __future__ import annotations

import torch
from torch import nn

from pagedserve.errors import ConfigError
from pagedserve.quantization.fp8_dtype import FP8, FP8_MAX
from pagedserve.model.kernels.fused_ops import QuantizedActivation

MIN_CAPABILITY = (8, 9)
_MIN_SCALE = 1e-12


def fp8_device_error(device: torch.device, what: str = "fp8") -> str | None:
    """Why `device` cannot run FP8 matmuls (one line), or None when it can."""
    if device.type != "cuda":
        return (f"{what} needs an NVIDIA GPU with compute capability >= 8.9 (Ada) / 9.0 (Hopper); "
                f"this is the {device.type.upper() if device.type != 'cpu' else 'CPU'}")
    idx = device.index if device.index is not None else torch.cuda.current_device()
    cap = tuple(torch.cuda.get_device_capability(idx))
    if cap < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(idx)
        return (f"{what} needs an NVIDIA GPU with compute capability >= 8.9 (Ada) / 9.0 (Hopper); "
                f"this GPU ({name}) has compute capability {cap[0]}.{cap[1]}")
    return None


def check_fp8_device(device: torch.device, param: str = "quantization", what: str = "--quantization fp8") -> None:
    """Refuse fp8 where the hardware has no fp8 tensor cores. PAGEDSERVE_FP8_EMULATE=1 lets the CPU run the
    reference arithmetic instead (tests and quality measurements: correct, not fast)."""
    import os

    if device.type == "cpu" and os.environ.get("PAGEDSERVE_FP8_EMULATE") == "1":
        return
    err = fp8_device_error(device, what)
    if err:
        hint = ("use --quantization int8 or awq on this device" if param == "quantization"
                else "use --kv-cache-dtype auto on this device")
        raise ConfigError(err, param=param, hint=hint)


# -- quantization arithmetic -----------------------------------------------------------------------
def quantize_fp8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row e4m3: (q fp8 [R, C], scale fp32 [R]) with w ~= q.float() * scale[:, None].

    Used for weights (rows = output channels) and, on the CPU, for activations (rows = tokens)."""
    wf = w.float()
    scale = (wf.abs().amax(dim=-1) / FP8_MAX).clamp(min=_MIN_SCALE)
    q = (wf / scale.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize_fp8_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float().unsqueeze(-1)).to(dtype)


def fp8_linear_reference(x: torch.Tensor, q_w: torch.Tensor, s_w: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """The FP8 GEMM's arithmetic on any device: per-token quantized x times the fp8 weight, fp32 accumulate,
    both scales applied to the fp32 product, result in x's dtype. What `_scaled_mm` computes (up to the
    order of fp32 accumulation)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    q_x, s_x = quantize_fp8_rows(x2)
    y = (q_x.float() @ q_w.float().t()) * s_x.unsqueeze(1) * s_w.float().unsqueeze(0)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*lead, q_w.shape[0])


def fp8_linear(x: torch.Tensor, q_w: torch.Tensor, s_w: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """The fp8 linear as served (W8A8 at every batch size): on CUDA the Triton kernel or `_scaled_mm`
    (dispatch.fp8_use_scaled_mm); elsewhere the same arithmetic in torch (emulation)."""
    if x.device.type != "cuda":
        return fp8_linear_reference(x, q_w, s_w, bias)
    from pagedserve.quantization.dispatch import fp8_use_scaled_mm
    from pagedserve.quantization.triton_w8a8 import w8a8_linear, w8a8_supported

    n, k = q_w.shape
    if fp8_use_scaled_mm(x.numel() // k, n, k):
        return fp8_linear_cuda(x, q_w, s_w, bias)
    if not w8a8_supported(n, k):
        return fp8_linear_reference(x, q_w, s_w, bias)
    return w8a8_linear(x, q_w, s_w, bias)


def fp8_linear_cuda(x: torch.Tensor, q_w: torch.Tensor, s_w: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (bf16/fp16) -> [..., N]: per-token quant (Triton) + rowwise-scaled `torch._scaled_mm`."""
    n, k = q_w.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:
        return x.new_empty(*lead, n)
    if k % 16 or n % 16:  # _scaled_mm's alignment rule; odd shapes take the exact but slow way
        return fp8_linear_reference(x, q_w, s_w, bias)
    from pagedserve.quantization.triton_w8a8 import per_token_quant

    q_x, s_x = per_token_quant(x2, FP8)
    return _scaled_mm_rowwise(q_x, s_x, q_w, s_w, bias, x.dtype).view(*lead, n)


def _scaled_mm_rowwise(q_x: torch.Tensor, s_x: torch.Tensor, q_w: torch.Tensor, s_w: torch.Tensor,
                       bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    # Rowwise scaling produces bf16; fp16 models get a cast (cheap next to the GEMM).
    y = torch._scaled_mm(q_x, q_w.t(), scale_a=s_x, scale_b=s_w.view(1, -1), out_dtype=torch.bfloat16)
    if y.dtype != out_dtype:
        y = y.to(out_dtype)
    return y if bias is None else y + bias


def fp8_linear_quantized(x: QuantizedActivation, q_w: torch.Tensor, s_w: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp8_linear for an input already quantized per token (a fused norm kernel wrote it), CUDA only:
    the same GEMM choice as fp8_linear, minus the quant kernel."""
    from pagedserve.quantization.dispatch import fp8_use_scaled_mm
    from pagedserve.quantization.triton_w8a8 import w8a8_gemm

    n, k = q_w.shape
    if fp8_use_scaled_mm(x.q.shape[0], n, k):
        return _scaled_mm_rowwise(x.q, x.scale, q_w, s_w, bias, x.dtype)
    return w8a8_gemm(x.q, x.scale, q_w, s_w, bias, x.dtype)


class Fp8Linear(nn.Module):
    """nn.Linear with an fp8 e4m3 weight [out, in] and an fp32 scale per output channel (`weight_scale`,
    vLLM's checkpoint name). Forward: `fp8_linear` (the W8A8 kernels on CUDA; the same arithmetic elsewhere
    for tests and quality measurements: the engine refuses fp8 serving off the GPU)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=FP8, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features, dtype=torch.float32, device=device),
                                         requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype or torch.get_default_dtype(), device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Fp8Linear":
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device)
        q, s = quantize_fp8_rows(w)
        with torch.no_grad():
            m.weight.copy_(q)
            m.weight_scale.copy_(s)
            if linear.bias is not None:
                m.bias.copy_(linear.bias.detach())
        return m

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts every floating tensor, fp8 included: follow device moves, keep the stored
        # dtypes (e4m3 values are exact in bf16/fp16/fp32, so the round trip loses nothing).
        super()._apply(fn, recurse)
        if self.weight.dtype != FP8:
            self.weight.data = self.weight.data.to(FP8)
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale.data = self.weight_scale.data.float()
        return self

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_fp8_rows(self.weight, self.weight_scale, dtype)

    def input_quant(self, x: torch.Tensor) -> torch.dtype | None:
        """FP8 when forward would quantize x per token with the shared kernel (CUDA, K % 16 == 0): the norm
        before this linear may then hand it a QuantizedActivation instead."""
        return FP8 if x.is_cuda and self.in_features % 16 == 0 else None

    def forward(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        if isinstance(x, QuantizedActivation):
            return fp8_linear_quantized(x, self.weight, self.weight_scale, self.bias)
        return fp8_linear(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 per-channel W8A8"


def fp8_linear_factory():
    """A `make_linear(in, out, bias)` building Fp8Linear projections (pre-quantized fp8 checkpoints)."""

    def make(in_features: int, out_features: int, bias: bool = False) -> Fp8Linear:
        return Fp8Linear(in_features, out_features, bias, dtype=torch.get_default_dtype())

    return make


# -- KV cache ----------------------------------------------------------------------------------------
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The storage dtype of the KV cache for --kv-cache-dtype (auto: the model's dtype)."""
    if kv_cache_dtype in ("fp8", "fp8_e4m3"):
        return FP8
    return model_dtype


def quantize_kv(x: torch.Tensor, scale: float) -> torch.Tensor:
    """K or V values -> e4m3 with one per-tensor scale (stored = clamp(x / scale)); saturates, never NaN."""
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
