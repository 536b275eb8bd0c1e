"""Pre-quantized FP8 checkpoints: recognise their `quantization_config`, and write them (tests, benchmarks).

Two layouts are loaded, both "static fp8 weights, dynamic activations":
* vLLM / AutoFP8 (`quant_method: "fp8"`): each projection has `weight` float8_e4m3fn [N, K] and
  `weight_scale` fp32, one per tensor (shape [] or [1]); `activation_scheme` "static" adds `input_scale`.
* llm-compressor (`quant_method: "compressed-tensors"`, format "float-quantized"): `weight` e4m3 and
  `weight_scale` [N, 1] (strategy "channel") or [1] (strategy "tensor").

pagedserve keeps one fp32 scale per output channel, so a per-tensor scale is broadcast over the rows
(exact). Activations are always quantized per token at run time: static `input_scale`s are ignored
(a per-token scale is at least as accurate as one calibrated per-tensor scale). Block-wise scales
(`weight_block_size`, DeepSeek-style), group strategies and non-8-bit formats are refused in one line.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pagedserve.errors import UnsupportedModelError
from pagedserve.quantization.fp8 import quantize_fp8_rows

FP8_METHODS = ("fp8", "compressed-tensors")


@dataclass(frozen=True)
class Fp8CheckpointConfig:
    method: str  # "fp8" | "compressed-tensors"
    weight_strategy: str  # "tensor" | "channel"

    @classmethod
    def from_hf(cls, qc: dict) -> "Fp8CheckpointConfig":
        method = str(qc.get("quant_method", "")).lower()
        if method == "fp8":
            if qc.get("weight_block_size"):
                raise UnsupportedModelError(
                    f"fp8 checkpoint uses block-wise weight scales (weight_block_size={qc['weight_block_size']}); "
                    "pagedserve loads per-tensor or per-channel fp8 checkpoints only")
            fmt = str(qc.get("fmt", "e4m3")).lower()
            if fmt != "e4m3":
                raise UnsupportedModelError(f"fp8 checkpoint format {fmt!r} is not supported; only e4m3")
            _check_ignored(qc.get("ignored_layers") or qc.get("modules_to_not_convert"))
            return cls("fp8", "tensor")
        if method != "compressed-tensors":
            raise UnsupportedModelError(f"not an fp8 quantization_config: quant_method {method!r}")
        groups = qc.get("config_groups") or {}
        if len(groups) != 1:
            raise UnsupportedModelError(
                f"compressed-tensors checkpoint has {len(groups)} config groups; pagedserve loads one fp8 group")
        g = next(iter(groups.values()))
        w = g.get("weights") or {}
        a = g.get("input_activations")
        if w.get("type") != "float" or w.get("num_bits") != 8:
            raise UnsupportedModelError(
                f"compressed-tensors weights are {w.get('num_bits')}-bit {w.get('type')!r}; pagedserve loads "
                "8-bit float (fp8) weights only (AWQ int4 checkpoints: quant_method 'awq')")
        strategy = w.get("strategy")
        if strategy not in ("tensor", "channel") or w.get("dynamic") or not w.get("symmetric", True):
            raise UnsupportedModelError(
                f"compressed-tensors fp8 weight strategy {strategy!r} (dynamic={w.get('dynamic')}, "
                f"symmetric={w.get('symmetric', True)}) is not supported; only static symmetric tensor/channel")
        if a is not None and (a.get("type") != "float" or a.get("num_bits") != 8):
            raise UnsupportedModelError(
                f"compressed-tensors activations are {a.get('num_bits')}-bit {a.get('type')!r}; only fp8 or none")
        targets = set(g.get("targets") or ["Linear"])
        if targets != {"Linear"}:
            raise UnsupportedModelError(f"compressed-tensors targets {sorted(targets)} are not supported; only Linear")
        _check_ignored(qc.get("ignore"))
        return cls("compressed-tensors", strategy)


def _check_ignored(names) -> None:
    """The LM head is always dense here; any other unquantized layer would need a mixed model."""
    rest = [n for n in (names or []) if not str(n).endswith("lm_head")]
    if rest:
        raise UnsupportedModelError(
            f"fp8 checkpoint leaves layers unquantized ({', '.join(map(str, rest[:3]))}); not supported yet")


def is_fp8_config(qc) -> bool:
    """Whether a checkpoint's `quantization_config` claims fp8 (further validation in `from_hf`)."""
    if not isinstance(qc, dict):
        return False
    method = str(qc.get("quant_method", "")).lower()
    if method == "fp8":
        return True
    if method == "compressed-tensors":
        groups = qc.get("config_groups") or {}
        return any((g.get("weights") or {}).get("type") == "float" for g in groups.values())
    return False


def normalize_fp8_tensor(name: str, t: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """A checkpoint tensor as pagedserve stores it: weight scales flattened to [N] or [1] (broadcast by the
    loader); static input scales, KV-cache scales and (symmetric) zero points dropped (None)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("input_scale", "k_scale", "v_scale", "weight_zero_point", "input_zero_point"):
        return None  # dynamic per-token activations; symmetric weights (checked in from_hf): zero points are 0
    if leaf == "weight_scale":
        return name, t.float().reshape(-1)
    return name, t


def quantization_config(scheme: str = "tensor") -> dict:
    if scheme == "tensor":  # vLLM / AutoFP8
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "ignored_layers": ["lm_head"]}
    if scheme == "channel":  # llm-compressor FP8_DYNAMIC
        return {
            "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": False,
                            "symmetric": True},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True,
                                      "symmetric": True}}},
        }
    raise ValueError(f"scheme must be 'tensor' or 'channel', got {scheme!r}")


def quantize_tensorwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale for the whole weight: (q e4m3 [N, K], scale fp32 [] )."""
    from pagedserve.quantization.fp8 import FP8, FP8_MAX

    wf = w.float()
    s = (wf.abs().max() / FP8_MAX).clamp(min=1e-12)
    return (wf / s).clamp_(-FP8_MAX, FP8_MAX).to(FP8), s.reshape(())


def write_fp8_checkpoint(src: str | Path, dst: str | Path, scheme: str = "tensor") -> Path:
    """Quantize an HF Llama-family checkpoint's projections to fp8 e4m3 in vLLM's layout.

    scheme "tensor": quant_method "fp8" (vLLM/AutoFP8), one fp32 `weight_scale` per projection;
    scheme "channel": quant_method "compressed-tensors" (llm-compressor FP8_DYNAMIC), `weight_scale` [N, 1].
    Embeddings, LM head, norms, biases and tokenizer files are copied as they are."""
    from pagedserve.quantization.checkpoint_writer import write_quantized_checkpoint

    qcfg = quantization_config(scheme)

    def quantize(name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        if scheme == "tensor":
            q, s = quantize_tensorwise(w)
        else:
            q, s = quantize_fp8_rows(w)
            s = s.unsqueeze(1)
        return {name: q, name + "_scale": s}

    return write_quantized_checkpoint(src, dst, quantize, {"quantization_config": qcfg})
