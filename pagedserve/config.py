"""Engine configuration: one dataclass, validated once, passed to every layer."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

from pagedserve.errors import ConfigError
from pagedserve.model.default_model import DEFAULT_MODEL_NAME

DTYPES = ("auto", "float32", "float16", "bfloat16")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
QUANTIZATIONS = ("none", "int8", "fp8", "awq")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
ATTENTION_BACKENDS = ("auto", "torch", "triton")
BLOCK_SIZES = (8, 16, 32, 64, 128)


def _one_of(values: tuple) -> str:
    *rest, last = map(str, values)
    return f"{', '.join(rest)} or {last}"


def flag(help: str, **argparse_kwargs) -> dict:
    """Field metadata: the field is also an engine command-line flag (`--field-name`), built from the
    field's default by `entrypoints/engine_args.py`, so a default is written once, here."""
    return {"flag": {"help": help, **argparse_kwargs}}


@dataclass
class EngineConfig:
    model: str | None = field(default=None, metadata=flag(
        f"HF dir, .gguf file or Hub id (default: the embedded {DEFAULT_MODEL_NAME})", dest="model_opt",
        metavar="MODEL"))
    tokenizer: str | None = None  # default: from the model
    served_model_name: str | None = None
    dtype: str = field(default="auto", metadata=flag(
        "auto: float32 on CPU, the checkpoint's dtype (bf16) on GPU", choices=DTYPES))
    device: str = field(default="auto", metadata=flag("auto: cuda if available, else cpu"))
    max_model_len: int | None = field(default=None, metadata=flag(
        "context length (default: the model's, at most 8192)", type=int))
    max_num_seqs: int = field(default=256, metadata=flag("sequences one step may run", type=int))
    max_num_batched_tokens: int | None = field(default=None, metadata=flag(
        "tokens one step may compute (default: by device, see default_token_budget)", type=int))
    block_size: int = field(default=16, metadata=flag("tokens per KV block", type=int,
                                                      choices=BLOCK_SIZES))
    gpu_memory_utilization: float = field(default=0.9, metadata=flag(
        "share of the GPU's memory the engine may use", type=float))
    kv_cache_memory: float | None = field(default=None, metadata=flag(
        "KV cache size in GiB (CPU default 1; GPU default: what gpu_memory_utilization leaves)", type=float))
    num_kv_blocks: int | None = None  # override the computed pool size (tests, planning)
    enable_prefix_caching: bool = field(default=True, metadata=flag(
        "reuse the KV blocks of shared prompt prefixes", action=argparse.BooleanOptionalAction))
    seed: int = field(default=0, metadata=flag("random seed (also the sampling seed of generate/chat)", type=int))
    load_format: str = field(default="auto", metadata=flag("checkpoint format", choices=LOAD_FORMATS))
    quantization: str | None = field(default=None, metadata=flag(
        "weights: int8 or fp8 (quantize a bf16/fp32 checkpoint on load; fp8 needs compute capability >= 8.9) "
        "or awq (pre-quantized int4 checkpoint); AWQ and fp8 checkpoints are detected from config.json "
        "without this flag", choices=QUANTIZATIONS, aliases=("-q",)))
    kv_cache_dtype: str = field(default="auto", metadata=flag(
        "KV cache storage: auto (the model's dtype) or fp8 (e4m3, per-tensor scale 1.0; twice the tokens; "
        "compute capability >= 8.9)", choices=KV_CACHE_DTYPES))
    tensor_parallel_size: int = field(default=1, metadata=flag(
        "split the model over N ranks (GPUs; on CPU, N processes sharing the cores)", type=int,
        aliases=("-tp",)))
    trust_remote_code: bool = field(default=False, metadata=flag(
        "accepted for vLLM compatibility and ignored: pagedserve never runs a checkpoint's code",
        action="store_true"))
    attention_backend: str = "auto"  # one of ATTENTION_BACKENDS
    enforce_eager: bool = field(default=False, metadata=flag("GPU: no CUDA graphs (debugging)",
                                                             action="store_true"))
    # Overlapped scheduling: step N+1 is scheduled and launched while the GPU runs step N (sampled tokens
    # stay on the device). None = on for a single CUDA device, off on CPU (nothing to overlap there).
    async_scheduling: bool | None = field(default=None, metadata=flag(
        "schedule and launch step N+1 while the GPU runs step N (default: on for one GPU, off on CPU); "
        "--no-async-scheduling gives the synchronous step, for A/B runs", action=argparse.BooleanOptionalAction))
    max_logprobs: int = 20
    # Speculative decoding, vLLM's keys: {"method": "ngram", "num_speculative_tokens": 4, ...} or its JSON text;
    # checked by engine/spec_decode/config.py when the engine starts.
    speculative_config: dict | str | None = field(default=None, metadata=flag(
        'speculative decoding as JSON, vLLM\'s keys: \'{"method": "ngram", "num_speculative_tokens": 4, '
        '"prompt_lookup_max": 4, "prompt_lookup_min": 2}\' (see docs/speculative-decoding.md)'))
    serving: bool = False  # set by the OpenAI server: a smaller default token budget (shorter steps under load)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be {_one_of(DTYPES)}, got {self.dtype!r}", param="dtype")
        if self.block_size not in BLOCK_SIZES:
            raise ConfigError(f"block_size must be {_one_of(BLOCK_SIZES)}, got {self.block_size}",
                              param="block_size")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}",
                param="gpu_memory_utilization",
            )
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ConfigError(f"kv_cache_memory must be > 0 GiB, got {self.kv_cache_memory}", param="kv_cache_memory")
        if self.max_num_seqs < 1:
            raise ConfigError("max_num_seqs must be >= 1", param="max_num_seqs")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError("max_model_len must be >= 2", param="max_model_len")
        if self.load_format not in LOAD_FORMATS:
            raise ConfigError(f"load_format must be {_one_of(LOAD_FORMATS)}, got {self.load_format!r}",
                              param="load_format")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization must be {_one_of(QUANTIZATIONS)}, got {self.quantization!r}",
                              param="quantization",
                              hint="int8/fp8 quantize a bf16/fp32 checkpoint on load (fp8: Ada/Hopper GPUs); "
                                   "awq loads a pre-quantized AWQ int4 checkpoint")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype must be {_one_of(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}",
                              param="kv_cache_dtype", hint="fp8 (= fp8_e4m3) halves the KV cache on Ada/Hopper GPUs")
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}",
                              param="tensor_parallel_size")
        if self.tensor_parallel_size > 1 and self.quantization == "awq":
            raise ConfigError("quantization='awq' is not supported with tensor_parallel_size > 1",
                              param="tensor_parallel_size", hint="use --quantization int8 or a single rank")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"attention_backend must be {_one_of(ATTENTION_BACKENDS)}",
                              param="attention_backend")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ConfigError(f"unknown engine option(s): {', '.join(unknown)}")
        return cls(**kwargs)


GiB = 1 << 30


def default_token_budget(device_memory: int, device_name: str, serving: bool) -> int:
    """max_num_batched_tokens when the user sets none: vLLM's defaults, so a user moving over keeps them.
    GPUs of >= 70 GiB other than the A100 (H100, H200, MI300): 16,384 tokens offline, 8,192 served; other
    GPUs 8,192 / 2,048 (vLLM found large budgets slow on the A100). The CPU (device_memory 0) keeps 2,048:
    it computes a prefill chunk slowly, and every running stream waits for the step that holds it."""
    if device_memory <= 0:
        return 2048
    if device_memory >= 70 * GiB and "a100" not in device_name.lower():
        return 8192 if serving else 16384
    return 2048 if serving else 8192

