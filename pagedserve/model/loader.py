"""Find a model, read its config, build the module and fill its weights.

Accepted: an HF directory (config.json + safetensors, sharded or not), a .gguf
file (dequantized into a cached HF directory), a Hub id already in the local
Hugging Face cache, or None for the embedded default. `load_format="dummy"`
skips the weights (random values of the right shapes) for performance work.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from pagedserve.errors import ConfigError

log = logging.getLogger(__name__)


def resolve_model_dir(model: str | None) -> Path:
    """Return a local HF-layout directory for `model`, converting/locating as needed."""
    from pagedserve.model.default_model import default_model_dir, gguf_to_hf_dir

    if model is None or model == "default":
        return default_model_dir()
    p = Path(model).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return gguf_to_hf_dir(p)
    if p.is_file() and p.name == "config.json":
        return p.parent
    if p.is_dir():
        if not (p / "config.json").exists():
            ggufs = sorted(p.glob("*.gguf"))
            if ggufs:
                return gguf_to_hf_dir(ggufs[0])
            raise ConfigError(
                f"model directory {p} is incomplete: config.json is missing", param="model",
                hint="point at a Hugging Face model directory (config.json + *.safetensors + tokenizer files)",
            )
        return p
    if p.exists() or "/" not in model or model.startswith((".", "/", "~")):
        raise ConfigError(f"model path {model!r} does not exist", param="model",
                          hint="give a model directory, a .gguf file or a Hub id")
    # A Hub id: use the local HF cache only; `pagedserve download` fetches.
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception as e:
        raise ConfigError(
            f"model {model!r} is neither a local path nor in the Hugging Face cache", param="model",
            hint=f"run `pagedserve download {model}` first, or pass a local directory",
        ) from e


def read_hf_config(model_dir: Path) -> dict:
    try:
        return json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {model_dir / 'config.json'}: {e}") from e


def _safetensor_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (model_dir / n).exists()]
        if missing:
            raise ConfigError(
                f"model directory {model_dir} is incomplete: missing {len(missing)} weight shard(s): "
                f"{', '.join(missing[:4])}",
                hint="re-run the download; it resumes",
            )
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        bins = sorted(model_dir.glob("pytorch_model*.bin"))
        if bins:
            return bins
        raise ConfigError(
            f"model directory {model_dir} has no weights (*.safetensors)",
            hint="download the model again or use --load-format dummy for random weights",
        )
    return files


def iter_weights(model_dir: Path):
    """Yield (name, tensor) from every weight file, one tensor at a time to bound memory.

    Checkpoints over 1 GiB show a progress bar with an ETA: a 7B load takes a while,
    and silence looks like a hang."""
    from safetensors import safe_open
    from tqdm import tqdm

    files = _safetensor_files(model_dir)
    total = sum(f.stat().st_size for f in files)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="Loading weights", mininterval=2.0,
               disable=total < (1 << 30))
    try:
        for f in files:
            if f.suffix == ".bin":
                tensors = torch.load(f, map_location="cpu", weights_only=True).items()
            else:
                sf = safe_open(str(f), framework="pt")
                tensors = ((name, sf.get_tensor(name)) for name in sf.keys())
            for name, t in tensors:
                yield name, t
                bar.update(t.numel() * t.element_size())
    finally:
        bar.close()


def init_dummy_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights of the right shapes: std 0.02 like HF's init, norms at 1."""
    if getattr(model, "tp", None) is not None:
        return _init_dummy_shard(model, seed)
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point():  # packed int4/int8 weights: any bits are valid values
                p.copy_(torch.randint(-2 ** 31, 2 ** 31 - 1, p.shape, generator=g, dtype=torch.int64).to(p.dtype))
            elif p.element_size() == 1:  # fp8 weights (no normal_ for float8): N(0, 1) in e4m3, scale 0.02 below
                src = torch.empty(p.shape, device=p.device)
                p.copy_((src.normal_(0.0, 1.0, generator=g) if p.device.type == "cpu" else src.normal_(0.0, 1.0))
                        .to(p.dtype))
            elif name.endswith("weight_scale"):
                p.fill_(0.02)
            elif "norm" in name:
                p.fill_(1.0)
            elif p.device.type == "cpu":
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.normal_(0.0, 0.02)


def _init_dummy_shard(model: torch.nn.Module, seed: int) -> None:
    """A tensor-parallel rank's slice of the very weights `init_dummy_weights` gives the whole model.

    Every full-size tensor is drawn in the unsplit model's order from one seeded generator on the
    model's device, then narrowed; so on CPU the TP=N model equals the TP=1 model. (On GPU the TP=1
    path draws from the global RNG instead, so the dummy weights there differ between TP sizes.)"""
    full_args, tp = model.full_args, model.tp
    with torch.device("meta"):
        full = type(model)(full_args, None, max_len=1)
    dev, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    g = torch.Generator(device=dev).manual_seed(seed)
    mine = dict(model.named_parameters())
    a = full_args
    sizes = (a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.intermediate_size)
    with torch.no_grad():
        for name, p in full.named_parameters():
            if "norm" in name:
                t = torch.ones(p.shape, dtype=dtype, device=dev)
            else:
                t = torch.empty(p.shape, dtype=dtype, device=dev).normal_(0.0, 0.02, generator=g)
            local = tp.shard.shard_fused_tensor(name, t, *sizes)
            if local is not None and name in mine:
                mine[name].copy_(local)


def load_tokenizer(model_dir: Path, tokenizer: str | None = None):
    """The model's tokenizer (or `tokenizer`'s); a QWen checkpoint's is built from its qwen.tiktoken."""
    from transformers import AutoTokenizer

    src = tokenizer or str(model_dir)
    if _model_type(Path(src)) == "qwen":
        from pagedserve.model.qwen_tokenizer import load_qwen_tokenizer

        return load_qwen_tokenizer(Path(src))
    try:
        return AutoTokenizer.from_pretrained(src)
    except Exception as e:
        raise ConfigError(
            f"cannot load a tokenizer from {src}: {str(e).splitlines()[0][:200]}",
            hint="the model directory needs tokenizer.json or tokenizer.model + tokenizer_config.json",
        ) from e


def _model_type(path: Path) -> str | None:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
