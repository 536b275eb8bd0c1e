"""Device, model and memory: everything one rank needs before the engine can schedule.

The engine core (scheduling, sampling, outputs) never touches a device choice, a weight file or
a memory budget; this module does, in start-up order: pick the device, read the checkpoint's
config, resolve quantization and tensor parallelism, check memory before loading, build and load
the model, size the KV cache (profiling on GPU) and wrap it all in a `ModelRunner`. Tensor-parallel
worker processes build a `Worker` alone (no tokenizer, no scheduler).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import torch

from pagedserve.config import GiB, EngineConfig, default_token_budget
from pagedserve.errors import ConfigError, OutOfMemoryError
from pagedserve.model.layers.attention import get_attention_backend
from pagedserve.model.default_model import DEFAULT_MODEL_NAME
from pagedserve.model.input_batch import InputBatch
from pagedserve.model.loader import init_dummy_weights, iter_weights, read_hf_config, resolve_model_dir
from pagedserve.model.model_args import ModelArgs
from pagedserve.model.registry import resolve_architecture
from pagedserve.model.runner import ModelRunner
from pagedserve.quantization.fp8 import check_fp8_device, fp8_linear_factory, kv_cache_torch_dtype
from pagedserve.quantization.fp8_format import normalize_fp8_tensor
from pagedserve.quantization.methods import (awq_linear_factory, is_prequantized_fp8, prepare_awq_for_gpu,
                                             quantize_model, resolve_quantization)
from pagedserve.runtime import configure_engine_threads

log = logging.getLogger("pagedserve.engine")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def select_device(name: str) -> torch.device:
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was requested but CUDA is not available",
                          hint="check the NVIDIA driver and that torch is a CUDA build, or use --device cpu")
    if dev.type == "cuda":
        _probe_gpu(dev)
    return dev


def _probe_gpu(dev: torch.device) -> None:
    """Run one tiny kernel so a torch build without this GPU's architecture fails here, in one clear line."""
    try:
        torch.ones(1, device=dev).add_(1)
        torch.cuda.synchronize(dev)
    except RuntimeError as e:
        if "no kernel image" not in str(e):
            raise
        cap = "%d.%d" % torch.cuda.get_device_capability(dev)
        raise ConfigError(
            f"this GPU ({torch.cuda.get_device_name(dev)}, compute capability {cap}) is not supported by the "
            f"installed torch build, which has kernels for {', '.join(torch.cuda.get_arch_list()) or 'no GPU'}",
            hint=f"install a torch build that includes sm_{cap.replace('.', '')} for your driver's CUDA version") from None


def select_dtype(name: str, device: torch.device, hf_config: dict) -> torch.dtype:
    if device.type == "cpu":
        return torch.float32 if name == "auto" else _DTYPES[name]
    bf16_ok = torch.cuda.get_device_capability(device)[0] >= 8
    if name == "auto":
        name = hf_config.get("torch_dtype") or hf_config.get("dtype") or "bfloat16"
        if name == "float32":
            name = "bfloat16"
    if name == "bfloat16" and not bf16_ok:
        cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
        log.warning("this GPU (compute capability %s) has no bfloat16 support; using float16", cap)
        name = "float16"
    return _DTYPES[name]


def _own_gpu_memory(dev: torch.device) -> int | None:
    """Bytes this process holds on `dev` (CUDA context included) as NVML reports it, or None when NVML
    is missing or cannot see this process (e.g. a container whose pids differ from the host's)."""
    try:
        import pynvml  # nvidia-ml-py
        pynvml.nvmlInit()
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            idx = int(visible.split(",")[idx])
        handle = pynvml.nvmlDeviceGetHandleByIndex(idx)
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid() and proc.usedGpuMemory:
                return int(proc.usedGpuMemory)
    except Exception:  # not installed, no driver access, UUIDs in CUDA_VISIBLE_DEVICES, ...
        return None
    return None


def check_moe_serving(quantization: str | None) -> None:
    """What the MoE layer cannot serve yet, refused before anything loads."""
    if quantization not in (None, "fp8"):
        raise ConfigError(f"--quantization {quantization} does not cover mixture-of-experts layers",
                          param="quantization", hint="use --quantization fp8 (experts per channel) or none")


class Worker:
    """One rank's device, model, KV cache and runner.

    Three stages, so the engine can fail fast on cheap checks (and load the tokenizer) before the
    weights are read: `Worker(config)` resolves the device, checkpoint config, quantization, tensor
    parallelism, dtype and lengths and checks memory; `load_model()` builds and loads the weights;
    `init_kv_cache()` sizes the KV cache and builds the runner. `tp_worker_main` is the entry point
    of tensor-parallel worker processes (rank 0 spawns them in `Worker(config)`); the engine passes
    it in so that `pagedserve.distributed` never imports the engine.
    """

    def __init__(self, config: EngineConfig, tp_worker_main: Callable | None = None):
        self.config = config
        self.t0 = time.time()
        configure_engine_threads()  # the usable cores, or PAGEDSERVE_NUM_THREADS (a bad value: one clear line)
        self.device = select_device(config.device)
        self.model_dir = resolve_model_dir(config.model)
        self.hf_config = read_hf_config(self.model_dir)
        self.model_cls = resolve_architecture(self.hf_config.get("architectures"), self.hf_config)
        self.args = ModelArgs.from_hf(self.hf_config)
        self.quantization = resolve_quantization(config.quantization, self.hf_config)
        if self.args.moe is not None:
            check_moe_serving(self.quantization)
        if self.quantization == "awq":
            self.args.make_linear = awq_linear_factory(self.hf_config)
        self.fp8_ckpt = self.quantization == "fp8" and is_prequantized_fp8(self.hf_config)
        if self.quantization == "fp8":
            check_fp8_device(self.device)
            if self.fp8_ckpt:
                if config.tensor_parallel_size > 1:
                    raise ConfigError("fp8 checkpoints are not supported with tensor_parallel_size > 1",
                                      param="tensor_parallel_size",
                                      hint="use a single rank, or --quantization fp8 on a bf16 checkpoint")
                self.args.make_linear = fp8_linear_factory()
        if config.kv_cache_dtype != "auto" and self.device.type == "cuda":  # the torch (CPU) backend emulates fp8
            check_fp8_device(self.device, param="kv_cache_dtype", what="--kv-cache-dtype fp8")
        self.tp = None  # TPGroup with tensor_parallel_size > 1: this process is rank 0 (or a worker's rank)
        if config.tensor_parallel_size > 1:
            from pagedserve.distributed.executor import init_tensor_parallel

            self.tp, self.device = init_tensor_parallel(config, self.args, self.device, self.quantization,
                                                        worker_main=tp_worker_main)
        self.dtype = select_dtype(config.dtype, self.device, self.hf_config)
        self.max_model_len = self._resolve_max_model_len()
        self.max_num_batched_tokens = config.max_num_batched_tokens or self._default_token_budget()
        self._check_memory()  # before allocating anything: refuse with numbers, not an OOM later
        self.served_model_name = config.served_model_name or (
            DEFAULT_MODEL_NAME if config.model in (None, "default") else str(config.model).rstrip("/"))
        self.kv_dtype = kv_cache_torch_dtype(config.kv_cache_dtype, self.dtype)
        self.model = None
        self.runner = None
        self.num_kv_blocks = 0
        self.load_seconds = 0.0

    def _default_token_budget(self) -> int:
        if self.device.type != "cuda":
            return default_token_budget(0, "cpu", self.config.serving)
        props = torch.cuda.get_device_properties(self.device)
        return default_token_budget(props.total_memory, props.name, self.config.serving)

    def load_model(self) -> None:
        """Build the model on its device (the host first when quantizing on load) and load its weights."""
        config = self.config
        backend = get_attention_backend(config.attention_backend, self.device)
        torch.manual_seed(config.seed)
        # int8/fp8 quantize after loading: load and quantize on the host, so the GPU never holds the dense
        # weights. Dummy weights (performance work) are drawn and quantized on the device: drawing 7B random
        # numbers on the host takes minutes.
        quantize_on_load = self.quantization == "int8" or (self.quantization == "fp8" and not self.fp8_ckpt)
        build_device = torch.device("cpu") if quantize_on_load and config.load_format != "dummy" else self.device
        with torch.device(build_device):
            model = self.model_cls(self.args, backend, max_len=self.max_model_len, tp=self.tp).to(self.dtype)
        if config.load_format == "dummy":
            init_dummy_weights(model, config.seed)
        else:
            tensors = iter_weights(self.model_dir)
            if self.fp8_ckpt:  # per-tensor scales broadcast per channel, static input scales dropped
                tensors = (r for n, t in tensors if (r := normalize_fp8_tensor(n, t)) is not None)
            model.load_hf_weights(tensors)
        if quantize_on_load:
            log.info("quantization %s: %d linear layers quantized per channel", self.quantization,
                     quantize_model(model, self.quantization))
            model.to(self.device)
        if hasattr(model, "expert_layout"):
            log.info("mixture of experts: %s", model.expert_layout())
        if self.quantization == "awq" and self.device.type == "cuda":
            done, left = prepare_awq_for_gpu(model)
            if left:
                log.warning("AWQ: %d of %d linears have in_features not a multiple of 128 and run the slow "
                            "unpack-per-call path", left, done + left)
        model.eval()
        self.model = model

    def init_kv_cache(self) -> None:
        """Size the KV cache (all ranks agree on one count) and build the runner over it."""
        config = self.config
        self.num_kv_blocks = self._num_kv_blocks()
        a, model = self.args, self.model
        self.runner = ModelRunner(model, self.num_kv_blocks, config.block_size, a.num_layers,
                                  model.args.num_kv_heads, a.head_dim, self.dtype, self.device, kv_dtype=self.kv_dtype)
        if self.device.type == "cuda" and self.quantization:  # before capture: see quantization/warmup.py
            from pagedserve.quantization.warmup import warm_up

            t0 = time.perf_counter()
            n = warm_up(self.model, self.dtype, self.max_num_batched_tokens)
            log.info("%s kernels warmed up for up to %d tokens (%d calls) in %.1fs", self.quantization,
                     self.max_num_batched_tokens, n, time.perf_counter() - t0)
        if self.device.type == "cuda" and hasattr(model, "warm_up_experts"):  # before capture, as above
            t0 = time.perf_counter()
            n = model.warm_up_experts(self.max_num_batched_tokens)
            log.info("fused MoE kernels warmed up for up to %d tokens (%d calls) in %.1fs",
                     self.max_num_batched_tokens, n, time.perf_counter() - t0)
        if self.tp is not None:  # no CUDA graphs with TP yet (NCCL capture untested)
            from pagedserve.distributed.executor import attach

            attach(self)
        elif self.device.type == "cuda" and not config.enforce_eager:
            self.runner.capture_decode_graphs(config.max_num_seqs, self.max_model_len)

    # -- set-up helpers ----------------------------------------------------
    def _resolve_max_model_len(self) -> int:
        limit = self.args.max_position_embeddings
        want = self.config.max_model_len
        if want is None:
            return min(limit, 8192)
        if want > limit:
            raise ConfigError(f"max_model_len={want} exceeds the model's context length {limit}",
                              param="max_model_len", hint=f"use --max-model-len {limit} or less")
        return want


    def _check_memory(self) -> None:
        from pagedserve.plan.model_shapes import ModelShape
        from pagedserve.plan.startup_check import check_memory_before_load

        cfg = self.config
        kv_pool = None
        if cfg.num_kv_blocks is None and (cfg.kv_cache_memory is not None or self.device.type != "cuda"):
            kv_pool = int((cfg.kv_cache_memory or 1.0) * GiB)
        total = torch.cuda.mem_get_info(self.device)[1] if self.device.type == "cuda" else None
        check_memory_before_load(ModelShape.from_config(self.hf_config), self.dtype.itemsize, self.quantization,
                                 self.device.type, kv_pool, total, cfg.gpu_memory_utilization,
                                 tp=cfg.tensor_parallel_size)

    def kv_bytes_per_block(self) -> int:
        a, kv_heads = self.args, self.model.args.num_kv_heads  # this rank's heads under tensor parallelism
        return 2 * a.num_layers * self.config.block_size * kv_heads * a.head_dim * self.kv_dtype.itemsize

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        per_block = self.kv_bytes_per_block()
        if self.tp is not None:
            from pagedserve.distributed.executor import peers_loaded

            peers_loaded(self.tp)  # every rank holds its shard (a worker's load error surfaces here)
        if cfg.num_kv_blocks is not None:
            n = cfg.num_kv_blocks
        elif cfg.kv_cache_memory is not None or self.device.type != "cuda":
            n = int((cfg.kv_cache_memory or 1.0) * GiB // per_block)
        else:
            n = self._profile_gpu_blocks(per_block)
        if self.tp is not None:  # one block count for all ranks: the smallest any rank can hold
            n = self.tp.min(n)
        min_blocks = -(-self.max_model_len // cfg.block_size)
        if n < min_blocks:
            raise OutOfMemoryError(
                f"the KV cache holds {n} blocks ({n * cfg.block_size} tokens) but one sequence of "
                f"max_model_len={self.max_model_len} needs {min_blocks} blocks",
                hint="lower --max-model-len or give the KV cache more memory "
                     "(--kv-cache-memory on CPU, --gpu-memory-utilization on GPU)")
        return n

    @torch.inference_mode()
    def _profile_gpu_blocks(self, per_block: int) -> int:
        """KV budget = utilization x total - (weights + activation peak of a full batch) - non-torch memory."""
        dev = self.device
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        # A full token budget of prompts, each at most max_model_len long (positions must stay in range).
        bs, left, next_block, prompts, tables = self.config.block_size, self.max_num_batched_tokens, 0, [], []
        while left > 0:
            m = min(left, self.max_model_len)
            prompts.append([0] * m)
            tables.append(list(range(next_block, next_block + -(-m // bs))))
            next_block += len(tables[-1])
            left -= m
        tmp = ModelRunner(self.model, next_block, bs, self.args.num_layers, self.model.args.num_kv_heads,
                          self.args.head_dim, self.dtype, dev, kv_dtype=self.kv_dtype)
        tmp.execute(InputBatch.prompts(prompts, tables, bs, prompt_lens=tmp.needs_prompt_lens))
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        del tmp
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        own = _own_gpu_memory(dev)  # this process only: replicas sharing a GPU must not count each other
        non_torch = (own if own is not None else total - free) - torch.cuda.memory_reserved(dev)
        budget = total * self.config.gpu_memory_utilization - peak - max(non_torch, 0)
        # Whatever the share says, the pool must fit in what is free now (graph capture needs a little more).
        budget = min(budget, free - (peak - torch.cuda.memory_allocated(dev)) - 512 * (1 << 20))
        if budget < per_block:
            raise OutOfMemoryError(
                f"no GPU memory left for the KV cache: {total / GiB:.1f} GiB x "
                f"{self.config.gpu_memory_utilization} = {total * self.config.gpu_memory_utilization / GiB:.1f} GiB "
                f"budget, weights+activations peak {peak / GiB:.1f} GiB, memory held by other processes or "
                f"outside torch {max(non_torch, 0) / GiB:.1f} GiB",
                hint="another engine on this GPU? give each a share with --gpu-memory-utilization, or set "
                     "--kv-cache-memory GiB; else lower --max-num-batched-tokens, quantize, or use a bigger GPU")
        return int(budget // per_block)

    def _log_startup(self) -> None:
        bs = self.config.block_size
        cap = self.num_kv_blocks * bs
        log.info("model %s (%s, %d layers) on %s, dtype %s, loaded in %.1fs",
                 self.served_model_name, self.hf_config.get("architectures", ["?"])[0], self.args.num_layers,
                 self.device, str(self.dtype).replace("torch.", ""), self.load_seconds)
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())  # int8/int4 at real size
        log.info("plan: weights %.2f GiB%s, KV %.1f KiB per token, %.1f MiB per sequence at max_model_len=%d "
                 "(`pagedserve plan` explains the arithmetic)", weights / GiB,
                 f" ({self.quantization})" if self.quantization else "",
                 self.kv_bytes_per_block() / bs / 1024, self.kv_bytes_per_block() * -(-self.max_model_len // bs)
                 / (1 << 20), self.max_model_len)
        log.info("KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB, %s); max concurrency at max_model_len=%d: "
                 "%.1f", self.num_kv_blocks, bs, cap, self.num_kv_blocks * self.kv_bytes_per_block() / GiB,
                 str(self.kv_dtype).replace("torch.", ""),
                 self.max_model_len, cap / self.max_model_len)

    def log_startup(self) -> None:
        """The start-up lines (model, plan, KV cache); load time counts from `Worker(config)` until now."""
        self.load_seconds = time.time() - self.t0
        self._log_startup()
