"""Engine configuration: one dataclass, validated once, passed to every layer."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from pagedserve.errors import ConfigError

_DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass
class EngineConfig:
    model: str | None = None  # HF dir, .gguf file, hub id (downloaded) or None: the embedded default
    tokenizer: str | None = None  # default: from the model
    served_model_name: str | None = None
    dtype: str = "auto"  # auto: float32 on CPU, the checkpoint's dtype (bf16) on GPU
    device: str = "auto"  # auto: cuda if available else cpu
    max_model_len: int | None = None  # default: min(model's context, 8192)
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # tokens one step may compute; default: default_token_budget
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: float | None = None  # GiB; CPU default 2 GiB, GPU: from utilization
    num_kv_blocks: int | None = None  # override the computed pool size (tests, planning)
    enable_prefix_caching: bool = True
    seed: int = 0
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    quantization: str | None = None  # none | int8 | fp8 (on load) | awq (pre-quantized; auto-detected from config.json)
    kv_cache_dtype: str = "auto"  # auto: the model's dtype | fp8 (= fp8_e4m3): half the bytes per KV token
    tensor_parallel_size: int = 1
    trust_remote_code: bool = False
    attention_backend: str = "auto"  # auto | torch | triton
    enforce_eager: bool = False  # GPU: skip CUDA-graph capture of decode steps
    # Overlapped scheduling: step N+1 is scheduled and launched while the GPU runs step N (sampled tokens
    # stay on the device). None = on for a single CUDA device, off on CPU (nothing to overlap there).
    async_scheduling: bool | None = None
    max_logprobs: int = 20
    # Speculative decoding, vLLM's keys: {"method": "ngram", "num_speculative_tokens": 4, ...} or its JSON text;
    # checked by engine/spec_decode/config.py when the engine starts.
    speculative_config: dict | str | None = None
    serving: bool = False  # set by the OpenAI server: a smaller default token budget (shorter steps under load)

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}", param="dtype")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ConfigError(f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size}", param="block_size")
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
        if self.load_format not in ("auto", "safetensors", "gguf", "dummy", "pt"):
            raise ConfigError(f"load_format must be auto, safetensors, gguf or dummy, got {self.load_format!r}")
        if self.quantization not in (None, "none", "int8", "awq", "fp8"):
            raise ConfigError(f"quantization must be none, int8, fp8 or awq, got {self.quantization!r}",
                              param="quantization",
                              hint="int8/fp8 quantize a bf16/fp32 checkpoint on load (fp8: Ada/Hopper GPUs); "
                                   "awq loads a pre-quantized AWQ int4 checkpoint")
        if self.kv_cache_dtype not in ("auto", "fp8", "fp8_e4m3"):
            raise ConfigError(f"kv_cache_dtype must be auto, fp8 or fp8_e4m3, got {self.kv_cache_dtype!r}",
                              param="kv_cache_dtype", hint="fp8 (= fp8_e4m3) halves the KV cache on Ada/Hopper GPUs")
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}",
                              param="tensor_parallel_size")
        if self.tensor_parallel_size > 1 and self.quantization == "awq":
            raise ConfigError("quantization='awq' is not supported with tensor_parallel_size > 1",
                              param="tensor_parallel_size", hint="use --quantization int8 or a single rank")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ConfigError("attention_backend must be auto, torch or triton", param="attention_backend")

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

