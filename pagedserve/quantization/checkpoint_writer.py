"""Write a quantized copy of an HF Llama-family checkpoint: the one walk that the AWQ and fp8 writers share.

Tests and benchmarks need quantized checkpoints and no hub is reachable, so pagedserve writes its own.
Every projection weight (`PROJECTIONS`) goes through the format's `quantize(name, weight)`, which returns
the tensors to store in its place; everything else (embeddings, LM head, norms, biases, tokenizer files)
is copied as it is, and config.json gains the format's entries.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_quantized_checkpoint(src: str | Path, dst: str | Path,
                               quantize: Callable[[str, torch.Tensor], dict[str, torch.Tensor]],
                               config_update: dict) -> Path:
    from safetensors.torch import save_file

    from pagedserve.model.loader import iter_weights

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    out: dict[str, torch.Tensor] = {}
    for name, t in iter_weights(src):
        parts = name.split(".")
        if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in PROJECTIONS:
            out.update({k: v.contiguous() for k, v in quantize(name, t).items()})
        else:
            out[name] = t.contiguous()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config_update)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(f, dst / f.name)
    return dst
