"""The synchronous engine: add_request / abort_request / step.

Each step schedules, runs one forward pass over the flat batch, samples, and
updates sequences (stop checks, detokenization, block release). It knows
nothing of HTTP or processes; the async engine and the offline `LLM` drive it.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import time

import torch

from pagedserve.config import EngineConfig
from pagedserve.engine.block_manager import BlockManager
from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.engine.fault_injection import FaultInjector
from pagedserve.engine.scheduler import Scheduler, ScheduledSeq
from pagedserve.engine.sequence import BeamHypothesis, Request, Sequence, Status
from pagedserve.errors import ConfigError, InvalidRequestError, OutOfMemoryError, PromptTooLongError
from pagedserve.model.attention import get_attention_backend
from pagedserve.model.llama import ModelArgs
from pagedserve.model.loader import (init_dummy_weights, iter_weights, load_tokenizer, read_hf_config,
                                     resolve_model_dir)
from pagedserve.model.fp8 import check_fp8_device, fp8_linear_factory, kv_cache_torch_dtype
from pagedserve.model.fp8_format import normalize_fp8_tensor
from pagedserve.model.quantization import (awq_linear_factory, is_prequantized_fp8, quantize_model,
                                           resolve_quantization)
from pagedserve.model.registry import resolve_architecture
from pagedserve.model.runner import ModelRunner
from pagedserve.model.sampler import SampleRow, sample
from pagedserve.outputs import CompletionOutput, Logprob, RequestOutput
from pagedserve.sampling_params import SamplingParams
from pagedserve.structured.manager import StructuredOutputManager

log = logging.getLogger("pagedserve.engine")

_GiB = 1 << 30
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


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        t0 = time.time()
        if os.environ.get("PAGEDSERVE_NUM_THREADS"):
            torch.set_num_threads(int(os.environ["PAGEDSERVE_NUM_THREADS"]))
        self.device = select_device(config.device)
        self.model_dir = resolve_model_dir(config.model)
        self.hf_config = read_hf_config(self.model_dir)
        model_cls = resolve_architecture(self.hf_config.get("architectures"))
        self.args = ModelArgs.from_hf(self.hf_config)
        self.quantization = resolve_quantization(config.quantization, self.hf_config)
        if self.quantization == "awq":
            self.args.make_linear = awq_linear_factory(self.hf_config)
        fp8_ckpt = self.quantization == "fp8" and is_prequantized_fp8(self.hf_config)
        if self.quantization == "fp8":
            check_fp8_device(self.device)
            if fp8_ckpt:
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

            self.tp, self.device = init_tensor_parallel(config, self.args, self.device, self.quantization)
        self.dtype = select_dtype(config.dtype, self.device, self.hf_config)
        self.max_model_len = self._resolve_max_model_len()
        self.max_num_batched_tokens = config.max_num_batched_tokens or 2048
        self._check_memory()  # before allocating anything: refuse with numbers, not an OOM later
        self.tokenizer = load_tokenizer(self.model_dir, config.tokenizer)
        self.eos_token_ids = self._eos_ids()
        self.served_model_name = config.served_model_name or (
            "SmolLM2-135M-Instruct" if config.model in (None, "default") else str(config.model).rstrip("/"))

        backend = get_attention_backend(config.attention_backend, self.device)
        torch.manual_seed(config.seed)
        self.kv_dtype = kv_cache_torch_dtype(config.kv_cache_dtype, self.dtype)
        # int8/fp8 quantize after loading: load and quantize on the host, so the GPU never holds the dense
        # weights. Dummy weights (performance work) are drawn and quantized on the device: drawing 7B random
        # numbers on the host takes minutes.
        quantize_on_load = self.quantization == "int8" or (self.quantization == "fp8" and not fp8_ckpt)
        build_device = torch.device("cpu") if quantize_on_load and config.load_format != "dummy" else self.device
        with torch.device(build_device):
            model = model_cls(self.args, backend, max_len=self.max_model_len, tp=self.tp).to(self.dtype)
        if config.load_format == "dummy":
            init_dummy_weights(model, config.seed)
        else:
            tensors = iter_weights(self.model_dir)
            if fp8_ckpt:  # per-tensor scales broadcast per channel, static input scales dropped
                tensors = (r for n, t in tensors if (r := normalize_fp8_tensor(n, t)) is not None)
            model.load_hf_weights(tensors)
        if quantize_on_load:
            log.info("quantization %s: %d linear layers quantized per channel", self.quantization,
                     quantize_model(model, self.quantization))
            model.to(self.device)
        model.eval()
        self.model = model

        self.num_kv_blocks = self._num_kv_blocks()
        a = self.args
        self.runner = ModelRunner(model, self.num_kv_blocks, config.block_size, a.num_layers,
                                  model.args.num_kv_heads, a.head_dim, self.dtype, self.device, kv_dtype=self.kv_dtype)
        if self.tp is not None:  # no CUDA graphs with TP yet (NCCL capture untested)
            from pagedserve.distributed.executor import attach

            attach(self)
        elif self.device.type == "cuda" and not config.enforce_eager:
            self.runner.capture_decode_graphs(config.max_num_seqs, self.max_model_len)
        self.block_manager = BlockManager(self.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, self.max_num_batched_tokens)
        self.requests: dict[str, Request] = {}
        self.failed: list[tuple[str, str]] = []  # requests aborted by an error in their own processing
        self._failed_ids: set[str] = set()
        self.faults = FaultInjector.from_env()  # tests only; inert unless PAGEDSERVE_FAULT_INJECT is set
        self._seq_ids = itertools.count()
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        # Structured outputs: grammars compile off the step loop; requests wait there until ready.
        self.structured = StructuredOutputManager(self.tokenizer, self.args.vocab_size, self.eos_token_ids)
        self.request_errors: list[tuple[str, InvalidRequestError]] = []  # failed after add_request: drain them
        self.load_seconds = time.time() - t0
        self._log_startup()

    # -- set-up helpers ----------------------------------------------------
    def _resolve_max_model_len(self) -> int:
        limit = self.args.max_position_embeddings
        sw = self.hf_config.get("sliding_window")
        if sw and self.hf_config.get("use_sliding_window", True):
            limit = min(limit, sw)  # no sliding-window attention yet: stay inside the window
        want = self.config.max_model_len
        if want is None:
            return min(limit, 8192)
        if want > limit:
            raise ConfigError(f"max_model_len={want} exceeds the model's context length {limit}",
                              param="max_model_len", hint=f"use --max-model-len {limit} or less")
        return want

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (self.hf_config.get("eos_token_id"),):
            if src is not None:
                ids |= set(src) if isinstance(src, list) else {src}
        gen = self.model_dir / "generation_config.json"
        if gen.exists():
            e = json.loads(gen.read_text()).get("eos_token_id")
            if e is not None:
                ids |= set(e) if isinstance(e, list) else {e}
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _check_memory(self) -> None:
        from pagedserve.plan import ModelShape, check_memory_before_load

        cfg = self.config
        kv_pool = None
        if cfg.num_kv_blocks is None and (cfg.kv_cache_memory is not None or self.device.type != "cuda"):
            kv_pool = int((cfg.kv_cache_memory or 1.0) * _GiB)
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
            n = int((cfg.kv_cache_memory or 1.0) * _GiB // per_block)
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
        bs, left, next_block, batch = self.config.block_size, self.max_num_batched_tokens, 0, []
        while left > 0:
            m = min(left, self.max_model_len)
            seq = Sequence(-1, 0, [0] * m)
            seq.block_table = list(range(next_block, next_block + -(-m // bs)))
            next_block += len(seq.block_table)
            batch.append(ScheduledSeq(seq, Request("profile", None, seq.token_ids, SamplingParams(max_tokens=1),
                                                   1, [seq]), m))
            left -= m
        tmp = ModelRunner(self.model, next_block, bs, self.args.num_layers, self.model.args.num_kv_heads,
                          self.args.head_dim, self.dtype, dev, kv_dtype=self.kv_dtype)
        tmp.execute(batch)
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
                f"no GPU memory left for the KV cache: {total / _GiB:.1f} GiB x "
                f"{self.config.gpu_memory_utilization} = {total * self.config.gpu_memory_utilization / _GiB:.1f} GiB "
                f"budget, weights+activations peak {peak / _GiB:.1f} GiB, memory held by other processes or "
                f"outside torch {max(non_torch, 0) / _GiB:.1f} GiB",
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
                 "(`pagedserve plan` explains the arithmetic)", weights / _GiB,
                 f" ({self.quantization})" if self.quantization else "",
                 self.kv_bytes_per_block() / bs / 1024, self.kv_bytes_per_block() * -(-self.max_model_len // bs)
                 / (1 << 20), self.max_model_len)
        log.info("KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB, %s); max concurrency at max_model_len=%d: "
                 "%.1f", self.num_kv_blocks, bs, cap, self.num_kv_blocks * self.kv_bytes_per_block() / _GiB,
                 str(self.kv_dtype).replace("torch.", ""),
                 self.max_model_len, cap / self.max_model_len)

    # -- requests ------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)

    def add_request(self, request_id: str, prompt: str | list[int] | None, params: SamplingParams | None = None,
                    prompt_token_ids: list[int] | None = None, arrival_time: float | None = None,
                    final_only: bool = False) -> Request:
        params = params or SamplingParams()
        params.validate()  # again: fields may have been changed since construction
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        text = prompt if isinstance(prompt, str) else None
        if prompt_token_ids is None:
            if isinstance(prompt, str):
                if not prompt:
                    raise InvalidRequestError("prompt: must not be empty", param="prompt")
                prompt_token_ids = self.tokenize(prompt)
            elif isinstance(prompt, list):
                prompt_token_ids = prompt
            else:
                raise InvalidRequestError("prompt: must be a string or a list of token ids", param="prompt")
        ids = prompt_token_ids
        if not ids:
            raise InvalidRequestError("prompt: must contain at least one token", param="prompt")
        vocab = self.args.vocab_size
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"prompt: token ids must be integers in [0, {vocab})", param="prompt")
        if any(t >= vocab for t in params.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids: token ids must be in [0, {vocab})", param="stop_token_ids")
        if params.top_k > vocab:
            raise InvalidRequestError(f"top_k: must be -1 or 0 (disabled) or in [1, {vocab}]", param="top_k")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise InvalidRequestError(f"logit_bias: token ids must be in [0, {vocab})", param="logit_bias")
        n = len(ids)
        if n >= self.max_model_len:
            raise PromptTooLongError(
                f"This model's maximum context length is {self.max_model_len} tokens, but the prompt has {n} tokens "
                f"(at least one token must be left for the completion)", param="prompt")
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = self.max_model_len - n
        elif n + max_tokens > self.max_model_len:
            raise PromptTooLongError(
                f"This model's maximum context length is {self.max_model_len} tokens, but {n + max_tokens} were "
                f"requested ({n} in the prompt, max_tokens={max_tokens} for the completion)", param="max_tokens")
        req = Request(request_id, text, list(ids), params, max_tokens,
                      [self._new_seq(0, ids, params)], arrival_time or time.time())
        req.final_only = final_only
        req.plain_greedy = (params.greedy and req.num_slots == 1 and not params.use_beam_search
                            and params.logprobs is None and params.repetition_penalty == 1.0
                            and not params.logit_bias
                            and not params.presence_penalty and not params.frequency_penalty)
        bs = self.config.block_size
        need = -(-(n + max_tokens) // bs) * req.num_slots
        if req.num_slots > self.config.max_num_seqs:
            raise InvalidRequestError(f"n/beam_width={req.num_slots} exceeds max_num_seqs={self.config.max_num_seqs}",
                                      param="n")
        if params.use_beam_search and req.num_slots > self.max_num_batched_tokens:
            # All beams decode in the same step; a smaller budget could never schedule them together.
            raise InvalidRequestError(f"beam_width={req.num_slots} exceeds max_num_batched_tokens="
                                      f"{self.max_num_batched_tokens}", param="beam_width")
        if need > self.num_kv_blocks:
            raise InvalidRequestError(
                f"this request may need {need} KV blocks ({req.num_slots} x {n + max_tokens} tokens) but the "
                f"cache has {self.num_kv_blocks}", param="max_tokens", hint="lower max_tokens or n")
        self.requests[request_id] = req
        if params.structured_outputs is None or self._submit_grammar(req):
            self.scheduler.add(req)
        return req

    def _new_seq(self, index: int, ids: list[int], params: SamplingParams) -> Sequence:
        seq = Sequence(next(self._seq_ids), index, ids)
        if params.detokenize and not params.use_beam_search:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
        if params.logprobs is not None:
            seq.logprobs = []
        self._seed(seq, params)
        return seq

    def _seed(self, seq: Sequence, params: SamplingParams) -> None:
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed((params.seed + seq.index) % 2**63)

    def _submit_grammar(self, req: Request) -> bool:
        try:
            return self.structured.submit(req)
        except InvalidRequestError:
            self.requests.pop(req.request_id, None)
            raise

    def _admit_compiled(self) -> None:
        """Hand requests whose grammar is now compiled to the scheduler; fail those that did not compile."""
        ready, failed = self.structured.poll()
        for req in ready:
            self.scheduler.add(req)
        for req, err in failed:
            self.requests.pop(req.request_id, None)
            req.status = Status.FINISHED
            self.request_errors.append((req.request_id, err))

    def abort_request(self, request_id: str) -> bool:
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        if req.params.structured_outputs is not None:
            self.structured.release(req)
        for seq in req.live_seqs:
            seq.finish_reason = "abort"
        self.scheduler.remove(req)
        req.status = Status.FINISHED
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.structured.pending)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    def stats(self) -> dict:
        s, bm = self.scheduler, self.block_manager
        return {
            "num_running": len(s.running),
            "num_waiting": len(s.waiting),
            "kv_cache_usage": bm.usage(),
            "num_preemptions": s.num_preemptions,
            "prefix_cache_queries": bm.prefix_queries,
            "prefix_cache_hits": bm.prefix_hits,
            "num_kv_blocks": self.num_kv_blocks,
        }

    # -- the step --------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.structured.pending:
            self._admit_compiled()
        out = self.scheduler.schedule()
        if not out.scheduled:
            self.structured.wait(0.01)  # only grammars compiling: do not spin
            return []
        now = time.time()
        for e in out.scheduled:
            if e.request.metrics.first_scheduled_time is None:
                e.request.metrics.first_scheduled_time = now
        self.runner.copy_blocks(self.block_manager.pending_copies)
        self.block_manager.pending_copies.clear()
        self.faults.on_step(out.scheduled)
        logits, sampled = self.runner.execute(out.scheduled)
        if self.structured.grammars:
            self.structured.apply_masks(logits, sampled)  # before penalties and sampling
        for e in out.scheduled:
            e.seq.num_computed += e.num_tokens
            self.block_manager.commit(e.seq)

        rows: list[SampleRow] = []
        row_seqs: list[tuple[Request, Sequence]] = []
        row_src: list[int] = []
        beams: dict[str, list[tuple[Sequence, int]]] = {}
        plain_rows: list[int] = []  # greedy rows with nothing else to apply: one argmax for all of them
        plain_seqs: list[tuple[Request, Sequence]] = []
        for i, e in enumerate(sampled):
            req, seq = e.request, e.seq
            if req.plain_greedy and seq.num_output_tokens >= req.params.min_tokens:
                plain_rows.append(i)
                plain_seqs.append((req, seq))
                continue
            if req.params.use_beam_search:
                beams.setdefault(req.request_id, []).append((seq, i))
                continue
            built = self._guarded(req, self._rows_for, req, seq)
            for s, row in built or ():
                rows.append(row)
                row_seqs.append((req, s))
                row_src.append(i)

        # From here on, work is per request: an exception in one request's sampling, beam scoring,
        # stop checks or detokenization aborts that request (reported through `failed`) and the
        # rest of the batch goes on. The model step above is shared: its errors end the step.
        touched: dict[str, Request] = {}
        if plain_rows:
            plain = logits if len(plain_rows) == logits.shape[0] else logits[plain_rows]
            for (req, seq), tok in zip(plain_seqs, plain.argmax(dim=-1).tolist()):
                self._guarded(req, self._append, req, seq, tok, None, None, now)
                touched[req.request_id] = req
        if rows:
            self._sample_and_append(logits, rows, row_seqs, row_src, now, touched)
        for rid, entries in beams.items():
            req = self.requests[rid]
            self._guarded(req, self._beam_step, req, entries, logits, now)
            touched[rid] = req

        outputs = []
        for req in touched.values():
            if req.request_id in self._failed_ids:
                continue
            if req.params.use_beam_search and not req.finished:
                continue  # beams are reported once, ranked, when the search ends
            if not req.live_seqs and not req.finished:
                self._finish_request(req, now)
            if req.finished or not req.final_only:
                out = self._guarded(req, self._make_output, req)
                if out is not None:
                    outputs.append(out)
        self._failed_ids.clear()
        return outputs

    # -- per-request isolation ---------------------------------------------------
    def _guarded(self, req: Request, fn, *args):
        """fn(*args), unless `req` already failed this step; an exception fails `req` only."""
        if req.request_id in self._failed_ids:
            return None
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - one request's bug must not end the batch
            self._fail_request(req, e)
            return None

    def _fail_request(self, req: Request, e: BaseException) -> None:
        log.error("request %s failed in the engine and was aborted (%s: %s); the batch goes on",
                  req.request_id, type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
        self._failed_ids.add(req.request_id)
        self.failed.append((req.request_id, f"{type(e).__name__}: {e}"))
        self.abort_request(req.request_id)

    def take_failed(self) -> list[tuple[str, str]]:
        """(request id, why) of requests aborted by an error since the last call."""
        out, self.failed = self.failed, []
        return out

    def _sample_and_append(self, logits, rows, row_seqs, row_src, now, touched) -> None:
        """Sample all rows in one batch; if that raises, again request by request so only the culprit fails."""
        try:
            self.faults.on_sample(rows)
            groups = [(None, list(range(len(rows))), self._sample_rows(logits, rows, row_src))]
        except Exception:  # noqa: BLE001
            by_req: dict[str, list[int]] = {}
            for j, (req, _) in enumerate(row_seqs):
                by_req.setdefault(req.request_id, []).append(j)
            groups = []
            for js in by_req.values():
                req = row_seqs[js[0]][0]
                sub = [rows[j] for j in js]
                res = self._guarded(req, self._sample_one, logits, sub, [row_src[j] for j in js])
                if res is not None:
                    groups.append((req, js, res))
        for _, js, (res, lp_info) in groups:
            for k, j in enumerate(js):
                req, seq = row_seqs[j]
                slp = res.sampled_logprobs[k] if res.sampled_logprobs is not None else None
                self._guarded(req, self._append, req, seq, res.token_ids[k], lp_info[k] if lp_info else None,
                              slp, now)
                touched[req.request_id] = req

    def _sample_one(self, logits, rows, src):
        self.faults.on_sample(rows)
        return self._sample_rows(logits, rows, src)

    def _sample_rows(self, logits, rows, src):
        need_lp = any(r.params.logprobs is not None for r in rows)
        res = sample(logits[src], rows, self.generator, need_lp)
        return res, (self._logprob_rows(res, rows) if need_lp else None)

    def _rows_for(self, req: Request, seq: Sequence) -> list[tuple[Sequence, SampleRow]]:
        targets = [seq]
        if req.num_slots > 1 and not req.forked:
            targets += self._fork(req, seq, req.params.n - 1)
        return [(s, self._sample_row(req, s)) for s in targets]

    def _fork(self, req: Request, parent: Sequence, count: int) -> list[Sequence]:
        children = []
        for k in range(count):
            child = parent.fork(next(self._seq_ids), len(req.seqs))
            self.block_manager.fork(parent, child)
            self._seed(child, req.params)
            req.seqs.append(child)
            children.append(child)
        req.forked = True
        return children

    def _sample_row(self, req: Request, seq: Sequence) -> SampleRow:
        p = req.params
        block = []
        if seq.num_output_tokens < p.min_tokens:
            block = sorted((set() if p.ignore_eos else self.eos_token_ids) | set(p.stop_token_ids))
        return SampleRow(p, req.prompt_token_ids, seq.output_token_ids, seq.generator, block)

    @staticmethod
    def _logprob_rows(res, rows: list[SampleRow]) -> list[tuple[list[int], list[float], int]]:
        """Per row: the top-k token ids and logprobs (k = the largest any row asked for) and the sampled
        token's rank, computed for all rows at once and read back in one transfer (not per row)."""
        lp = res.logprobs
        tok = torch.tensor(res.token_ids, device=lp.device)
        ranks = (lp > lp.gather(1, tok[:, None])).sum(dim=1) + 1
        k = max((r.params.logprobs or 0) for r in rows)
        if k:
            vals, idx = lp.topk(k, dim=-1)
            packed = torch.cat([ranks[:, None].to(lp.dtype), vals, idx.to(lp.dtype)], dim=1).tolist()
            # ids and ranks < 2^24 are exact in fp32; vocabularies are far smaller
            return [([int(t) for t in row[1 + k:]], row[1:1 + k], int(row[0])) for row in packed]
        return [([], [], r) for r in ranks.tolist()]

    def _record_logprobs(self, seq: Sequence, k: int, info: tuple[list[int], list[float], int] | None,
                         token: int, slp: float | None) -> None:
        if slp is not None:
            seq.cumulative_logprob += slp
        if seq.logprobs is None or info is None:
            return
        ids, vals, rank = info
        entry: dict[int, Logprob] = {}
        for r, (t, v) in enumerate(zip(ids[:k], vals[:k]), start=1):
            entry[t] = Logprob(v, r, self.tokenizer.decode([t]))
        if token not in entry:
            entry[token] = Logprob(float(slp), rank, self.tokenizer.decode([token]))
        seq.logprobs.append(entry)

    def _append(self, req: Request, seq: Sequence, token: int, lp_info, slp, now: float) -> None:
        p = req.params
        grammar_done = p.structured_outputs is not None and self.structured.accept(req, seq, token)
        seq.token_ids.append(token)
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        req.metrics.last_token_time = now
        self._record_logprobs(seq, p.logprobs or 0, lp_info, token, slp)
        if token in self.eos_token_ids and not p.ignore_eos:
            seq.finish_reason = "stop"
        elif token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        else:
            if seq.detokenizer is not None:
                before = len(seq.output_text)
                seq.output_text += seq.detokenizer.step(token)
                if p.stop_list and seq.num_output_tokens >= p.min_tokens:
                    self._check_stop_strings(seq, p, before)
        if grammar_done and not seq.finished:
            seq.finish_reason = "stop"
        if not seq.finished and (seq.num_output_tokens >= req.max_tokens or seq.num_tokens >= self.max_model_len):
            seq.finish_reason = "length"
        if seq.finished:
            self.block_manager.free_seq(seq)

    @staticmethod
    def _check_stop_strings(seq: Sequence, p: SamplingParams, before: int) -> None:
        text = seq.output_text
        longest = max(len(s) for s in p.stop_list)
        start = max(0, before - longest + 1)
        best = None
        for s in p.stop_list:
            i = text.find(s, start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            i, s = best
            seq.output_text = text[:i + len(s)] if p.include_stop_str_in_output else text[:i]
            seq.finish_reason, seq.stop_reason = "stop", s

    # -- beam search -------------------------------------------------------------
    def _beam_step(self, req: Request, entries: list[tuple[Sequence, int]], logits: torch.Tensor, now: float) -> None:
        """Keep the beam_width best continuations over all live beams; forks share blocks (CoW)."""
        p = req.params
        width = p.beam_width
        live = req.live_seqs
        got = {s.seq_id for s, _ in entries}
        if got != {s.seq_id for s in live}:
            # Some beams did not finish recomputing this step: redo their last token next step.
            for s, _ in entries:
                s.num_computed -= 1
            return
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        rows = torch.stack([logits[i] for _, i in entries])
        lps = torch.log_softmax(rows, dim=-1)
        out_len = live[0].num_output_tokens
        stop_ids = (set() if p.ignore_eos else set(self.eos_token_ids)) | set(p.stop_token_ids)
        if out_len < p.min_tokens and stop_ids:
            lps[:, sorted(stop_ids)] = float("-inf")
        cum = torch.tensor([s.cumulative_logprob for s, _ in entries], device=lps.device)
        scores = (cum[:, None] + lps).flatten()
        top = scores.topk(min(2 * width, scores.numel()))
        vocab = lps.shape[1]
        chosen: list[tuple[int, int, float]] = []  # (beam index, token, cumulative logprob)
        for score, flat in zip(top.values.tolist(), top.indices.tolist()):
            b, tok = divmod(flat, vocab)
            if tok in stop_ids:
                seq = entries[b][0]
                ids = seq.output_token_ids + [tok]
                req.beam_done.append(BeamHypothesis(ids, score, self._beam_score(score, len(ids), p), "stop",
                                                    tok if tok in p.stop_token_ids else None))
            else:
                chosen.append((b, tok, score))
            if len(chosen) == width:
                break
        children: dict[int, list[tuple[int, float]]] = {}
        for b, tok, score in chosen:
            children.setdefault(b, []).append((tok, score))
        new_seqs: list[Sequence] = []
        for b, (seq, _) in enumerate(entries):
            kids = children.get(b)
            if not kids:
                seq.finish_reason = "pruned"
                self.block_manager.free_seq(seq)
                continue
            for tok, score in kids[1:]:
                child = seq.fork(next(self._seq_ids), 0)
                self.block_manager.fork(seq, child)
                child.token_ids.append(tok)
                child.cumulative_logprob = score
                new_seqs.append(child)
            seq.token_ids.append(kids[0][0])
            seq.cumulative_logprob = kids[0][1]
            new_seqs.append(seq)
        req.seqs = new_seqs
        req.forked = True
        n_out = out_len + 1
        if not new_seqs:
            self._finish_request(req, now)
            return
        hit_length = n_out >= req.max_tokens or new_seqs[0].num_tokens >= self.max_model_len
        done = sorted(req.beam_done, key=lambda h: h.score, reverse=True)
        best_live = max(s.cumulative_logprob for s in new_seqs)
        enough = len(done) >= width and done[width - 1].score >= self._beam_score(best_live, n_out, p)
        if hit_length or enough:
            if hit_length:
                for s in new_seqs:
                    ids = s.output_token_ids
                    req.beam_done.append(BeamHypothesis(ids, s.cumulative_logprob,
                                                        self._beam_score(s.cumulative_logprob, len(ids), p), "length"))
            for s in new_seqs:
                s.finish_reason = "pruned"
                self.block_manager.free_seq(s)
            self._finish_request(req, now)

    @staticmethod
    def _beam_score(cum: float, length: int, p: SamplingParams) -> float:
        try:
            return cum / (max(length, 1) ** p.length_penalty)
        except (OverflowError, ZeroDivisionError):  # out-of-range penalties are refused; stay total anyway
            return float("-inf")

    # -- outputs -------------------------------------------------------------------
    def _finish_request(self, req: Request, now: float) -> None:
        req.status = Status.FINISHED
        req.metrics.finished_time = now
        if req.params.structured_outputs is not None:
            self.structured.release(req)
        self.scheduler.remove(req)
        self.requests.pop(req.request_id, None)

    def _make_output(self, req: Request) -> RequestOutput:
        p = req.params
        if p.use_beam_search:
            best = sorted(req.beam_done, key=lambda h: h.score, reverse=True)[:p.n]
            outs = [CompletionOutput(i, self.tokenizer.decode(h.token_ids, skip_special_tokens=p.skip_special_tokens)
                                     if p.detokenize else "", h.token_ids, h.cumulative_logprob, None,
                                     h.finish_reason, h.stop_reason) for i, h in enumerate(best)]
            return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, True, req.metrics,
                                 req.seqs[0].num_cached_tokens if req.seqs else 0,
                                 [(o.text, o.token_ids) for o in outs])
        holdback = max((len(s) for s in p.stop_list), default=1) - 1
        outs, deltas = [], []
        for seq in req.seqs:
            text = seq.output_text
            visible = len(text) if seq.finished else max(seq.text_sent, len(text) - holdback)
            out_ids = seq.output_token_ids
            deltas.append((text[seq.text_sent:visible], out_ids[seq.tokens_sent:]))
            seq.text_sent, seq.tokens_sent = visible, len(out_ids)
            outs.append(CompletionOutput(seq.index, text[:visible], out_ids,
                                         seq.cumulative_logprob if seq.logprobs is not None else None,
                                         seq.logprobs, seq.finish_reason, seq.stop_reason))
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, req.finished, req.metrics,
                             req.seqs[0].num_cached_tokens, deltas)
