"""AWQ "GEMM" checkpoint format: int4 packing, round-to-nearest quantization, and a checkpoint writer.

Layout of one quantized linear with in_features K, out_features N and group size G (AutoAWQ's
`WQLinear_GEMM`, what vLLM and transformers load as `quant_method: awq, version: gemm`):

* ``qweight`` int32 [K, N / 8]: eight 4-bit values per int32, along the output dimension;
* ``qzeros``  int32 [K / G, N / 8]: the integer zero point of each (group, output column), packed the same way;
* ``scales``  fp16  [K / G, N]: the scale of each (group, output column).

W[n, k] = (q[k, n] - z[k // G, n]) * s[k // G, n]. Within an int32 the eight columns c*8 + j are not stored
in order: nibble i (bits 4i..4i+3) holds column c*8 + AWQ_ORDER[i], so column j sits in nibble
AWQ_REVERSE_ORDER[j] (AWQ's CUDA kernel unpacks in this interleaved order).

The writer does plain round-to-nearest (no activation-aware scale search): enough to make test and
benchmark checkpoints in the real on-disk format. Real AWQ checkpoints come from AutoAWQ / llm-compressor.
"""
from __future__ import annotations

from pathlib import Path

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
PACK = 8  # int4 values per int32

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[R, C] integers in 0..15 -> int32 [R, C / 8] in AWQ's interleaved nibble order."""
    r, c = q.shape
    if c % PACK:
        raise ValueError(f"cannot pack {c} columns into int32 words of 8")
    if q.min() < 0 or q.max() > 15:
        raise ValueError("int4 values must lie in 0..15")
    cols = q.to(torch.int64).view(r, c // PACK, PACK)
    out = torch.zeros(r, c // PACK, dtype=torch.int64, device=q.device)
    for i, j in enumerate(AWQ_ORDER):
        out |= cols[:, :, j] << (4 * i)
    # Values above 2**31 - 1 wrap to negative int32, bit for bit.
    return torch.where(out >= 2 ** 31, out - 2 ** 32, out).to(torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C / 8] -> int32 [R, C] values in 0..15 (inverse of `pack_int4`)."""
    # AWQ_REVERSE_ORDER[j] * 4, computed on the device: no host-to-device copy, so the GPU's unpack-per-call
    # path (in_features not a multiple of 128) can be captured in a CUDA graph.
    j = torch.arange(8, dtype=torch.int32, device=packed.device)
    shifts = (j // 2 + (j % 2) * 4) * 4
    vals = (packed.unsqueeze(-1) >> shifts) & 0xF  # arithmetic shift; the mask drops the sign bits
    return vals.reshape(packed.shape[0], -1)


def rtn_quantize(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest int4 of an nn.Linear weight [N, K], groups of `group_size` along K.

    Returns (qweight int32 [K, N/8], qzeros int32 [K/G, N/8], scales fp16 [K/G, N])."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of group_size {group_size}")
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)  # [N, K/G]
    scales = ((hi - lo).clamp(min=1e-5) / 15).half()
    s = scales.float()
    zeros = torch.round(-lo / s).clamp(0, 15)
    q = torch.round(w / s.unsqueeze(-1) + zeros.unsqueeze(-1)).clamp(0, 15).to(torch.int32)  # [N, K/G, G]
    qweight = pack_int4(q.reshape(n, k).t().contiguous())
    qzeros = pack_int4(zeros.to(torch.int32).t().contiguous())
    return qweight, qzeros, scales.t().contiguous()


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight [N, K] (nn.Linear layout) a quantized linear stands for."""
    k = qweight.shape[0]
    group = k // qzeros.shape[0]
    q = unpack_int4(qweight)  # [K, N]
    z = unpack_int4(qzeros).repeat_interleave(group, dim=0)
    s = scales.to(dtype).repeat_interleave(group, dim=0)
    return ((q - z).to(dtype) * s).t().contiguous()


KBLOCK = 128  # K rows per block of the K-strided packing


def to_kstrided(qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ GEMM-format tensors -> the K-strided layout of triton_quant's transposed kernel.

    qw int32 [N, K / 8]: in each block of 128 K rows, word w (0..15) of row n holds, in nibble j (bits
    4j..4j+3), q[k = block * 128 + 16 j + w, n]. Shifting out nibble j of a block's 16 words gives the
    [N, 16] slice of K rows 16 j .. 16 j + 15 directly, with no reshape. zeros uint8 [K / G, N], unpacked.
    Needs K % 128 == 0. Same int4 bytes as the checkpoint's packing."""
    k = qweight.shape[0]
    if k % KBLOCK:
        raise ValueError(f"the K-strided layout needs in_features % {KBLOCK} == 0, got {k}")
    q = unpack_int4(qweight).t().to(torch.int64)  # [N, K]
    n = q.shape[0]
    q = q.reshape(n, k // KBLOCK, 8, 16)  # [N, block, j, w]
    words = torch.zeros(n, k // KBLOCK, 16, dtype=torch.int64, device=q.device)
    for j in range(8):
        words |= q[:, :, j, :] << (4 * j)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    return words.reshape(n, k // 8).contiguous(), unpack_int4(qzeros).to(torch.uint8).contiguous()


def dequantize_kstrided(qw: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight [N, K] of the K-strided layout (`to_kstrided`)."""
    n, k = qw.shape[0], qw.shape[1] * 8
    group = k // zeros.shape[0]
    words = qw.reshape(n, k // KBLOCK, 1, 16)
    shifts = (torch.arange(8, device=qw.device, dtype=torch.int32) * 4).view(1, 1, 8, 1)
    q = ((words >> shifts) & 0xF).reshape(n, k)
    z = zeros.t().to(torch.int32).repeat_interleave(group, dim=1)
    s = scales.t().to(dtype).repeat_interleave(group, dim=1)
    return (q - z).to(dtype) * s


def quantization_config(group_size: int) -> dict:
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}


def write_awq_checkpoint(src: str | Path, dst: str | Path, group_size: int = 128) -> Path:
    """Quantize an HF Llama-family checkpoint's projections (round-to-nearest) into an AWQ-format directory.

    Everything else (embeddings, LM head, norms, biases, tokenizer files) is copied as is; the config
    gains `quantization_config`."""
    from pagedserve.quantization.checkpoint_writer import write_quantized_checkpoint

    def quantize(name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        stem = name.rsplit(".", 1)[0]
        qw, qz, sc = rtn_quantize(w, group_size)
        return {stem + ".qweight": qw, stem + ".qzeros": qz, stem + ".scales": sc}

    return write_quantized_checkpoint(src, dst, quantize, {"quantization_config": quantization_config(group_size),
                                                           "torch_dtype": "float16"})
