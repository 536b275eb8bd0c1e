"""Memory planner: will this model and its KV cache fit this GPU at this concurrency?

The arithmetic is the one the engine itself does at start-up, so the plan and
the real block count agree:

    budget   = GPU memory x gpu_memory_utilization          (per GPU)
    weights  = parameters x bytes per parameter / TP          (quantized linears shrink)
    overhead = CUDA context + activation peak of one full batch
    KV pool  = budget - weights - overhead
    blocks   = KV pool // (2 x layers x block_size x kv_heads/TP x head_dim x dtype bytes)

On CPU there is no budget to divide: the KV pool is `kv_cache_memory` GiB.
No torch import here: `pagedserve plan` must answer in a blink.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pagedserve.config import GiB, default_token_budget
from pagedserve.errors import ConfigError
from pagedserve.model.hf_config import DecoderShape


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Quantized linear layers as pagedserve stores them (pagedserve/quantization/methods.py):
# int8: 1 byte a weight + one scale a row in the compute dtype;
# int4 AWQ: 0.5 byte a weight + per group of AWQ_GROUP inputs one scale (compute dtype) and a 4-bit zero;
# fp8: 1 byte a weight (e4m3) + one fp32 scale a row.
QUANT_METHODS = (None, "none", "int8", "fp8", "awq", "int4")
# --kv-cache-dtype: bytes per cached K or V element (None: the compute dtype's).
KV_DTYPE_BYTES = {"auto": None, "fp8": 1, "fp8_e4m3": 1}
AWQ_GROUP = 128


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float  # what the driver reports as total (nvidia-smi), not the marketing number
    compute_capability: tuple[int, int]

    @property
    def bf16(self) -> bool:
        return self.compute_capability >= (8, 0)


GPUS = {g.name.lower(): g for g in (
    GPU("V100-16GB", 16160 / 1024, (7, 0)),
    GPU("V100-32GB", 32510 / 1024, (7, 0)),
    GPU("T4-16GB", 15360 / 1024, (7, 5)),
    GPU("A10-24GB", 23028 / 1024, (8, 6)),
    GPU("L4-24GB", 23034 / 1024, (8, 9)),
    GPU("A100-40GB", 40960 / 1024, (8, 0)),
    GPU("A100-80GB", 81920 / 1024, (8, 0)),
    GPU("H100-80GB", 81559 / 1024, (9, 0)),
    GPU("H200-141GB", 143771 / 1024, (9, 0)),
)}

# Shapes of well-known checkpoints (from their config.json), so planning needs no download.
KNOWN_MODELS: dict[str, dict] = {
    "Qwen/Qwen-7B": dict(vocab_size=151936, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192,
                         tie_word_embeddings=False, torch_dtype="bfloat16", attention_bias=True),
    "Qwen/Qwen2.5-7B-Instruct": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                     num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                     max_position_embeddings=32768, tie_word_embeddings=False,
                                     torch_dtype="bfloat16", attention_bias=True),
    "Qwen/Qwen2.5-0.5B-Instruct": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                       max_position_embeddings=32768, tie_word_embeddings=True,
                                       torch_dtype="bfloat16", attention_bias=True),
    "meta-llama/Meta-Llama-3-8B-Instruct": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                                num_hidden_layers=32, num_attention_heads=32,
                                                num_key_value_heads=8, max_position_embeddings=8192,
                                                tie_word_embeddings=False, torch_dtype="bfloat16"),
    "meta-llama/Llama-2-7b-hf": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                     max_position_embeddings=4096, tie_word_embeddings=False,
                                     torch_dtype="float16"),
    "mistralai/Mistral-7B-Instruct-v0.3": dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                                               num_hidden_layers=32, num_attention_heads=32,
                                               num_key_value_heads=8, max_position_embeddings=32768,
                                               tie_word_embeddings=False, torch_dtype="bfloat16"),
}

# Fixed costs outside the weights and KV on a GPU: CUDA context, cuBLAS workspaces, allocator slack.
CUDA_CONTEXT_GIB = 0.75


@dataclass
class ModelShape(DecoderShape):
    name: str
    checkpoint_dtype: str = "bfloat16"

    @classmethod
    def from_config(cls, cfg: dict, name: str = "model") -> "ModelShape":
        return cls.from_hf(cfg, name=name)

    # -- parameter counts ---------------------------------------------------
    def linear_params(self) -> int:
        """Weights of the transformer blocks' matmuls (what weight quantization shrinks)."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = h * (q + 2 * kv) + q * h
        mlp = 3 * h * self.intermediate_size
        return self.num_layers * (attn + mlp)

    def linear_rows(self) -> int:
        """Output channels of those matmuls (one int8 scale each)."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return self.num_layers * ((q + 2 * kv) + h + 2 * self.intermediate_size + h)

    def other_params(self) -> int:
        """Embeddings, LM head, norms and biases: kept in the compute dtype."""
        emb = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else emb
        norms = self.num_layers * 2 * self.hidden_size + self.hidden_size
        bias = self.num_layers * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.qkv_bias else 0
        return emb + head + norms + bias

    def num_params(self) -> int:
        return self.linear_params() + self.other_params()

    def kv_bytes_per_token(self, dtype_bytes: int, tp: int = 1, kv_heads: int | None = None) -> int:
        """K and V for every layer; KV heads split over TP ranks (replicated when fewer heads than ranks;
        with an uneven split the fullest rank, which sets every rank's block count)."""
        kv_heads = kv_heads or max(1, math.ceil(self.num_kv_heads / tp))
        return 2 * self.num_layers * kv_heads * self.head_dim * dtype_bytes

    def tp_shards(self, tp: int):
        """The engine's tensor-parallel partition of this model (ConfigError if it cannot be split)."""
        from pagedserve.distributed.partition import plan_shards

        return plan_shards(self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate_size,
                           self.vocab_size, tp)


def weight_bytes(shape: ModelShape, dtype_bytes: int, quantization: str | None = None, tp: int = 1) -> int:
    """Per-GPU weight memory."""
    if quantization not in QUANT_METHODS:
        raise ConfigError(f"quantization must be one of none, int8, fp8, awq/int4, got {quantization!r}",
                          param="quantization")
    n = shape.linear_params()
    if quantization == "int8":
        linear = n + shape.linear_rows() * dtype_bytes
    elif quantization == "fp8":
        linear = n + shape.linear_rows() * 4
    elif quantization in ("awq", "int4"):
        linear = n * (0.5 + (dtype_bytes + 0.5) / AWQ_GROUP)
    else:
        linear = n * dtype_bytes
    return int((linear + shape.other_params() * dtype_bytes) / tp)


def activation_bytes(shape: ModelShape, max_num_batched_tokens: int, dtype_bytes: int) -> int:
    """Peak of one forward over a full token budget: the widest intermediate (MLP gate+up and the
    hidden states around it) plus fp32 logits for the rows that sample. An estimate; the engine
    measures the real peak on the GPU."""
    t = max_num_batched_tokens
    mlp = t * (3 * shape.intermediate_size + 4 * shape.hidden_size) * dtype_bytes
    qkv = t * (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim * dtype_bytes
    logits = min(t, 256) * shape.vocab_size * 4
    return max(mlp, qkv) + logits


@dataclass
class PlanInput:
    model: ModelShape
    gpu: GPU | None  # None: CPU, the KV pool is kv_cache_memory
    dtype: str = "auto"
    quantization: str | None = None
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: float | None = None  # GiB; CPU pool, or an explicit GPU pool
    max_model_len: int | None = None
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    concurrency: int | None = None
    seq_len: int | None = None  # tokens a typical sequence holds; default max_model_len (worst case)
    replicas: int = 1
    tensor_parallel_size: int = 1
    kv_cache_dtype: str = "auto"


@dataclass
class Plan:
    model: str
    device: str
    dtype: str
    quantization: str | None
    tensor_parallel_size: int
    replicas: int
    kv_cache_dtype: str
    gpus_needed: int
    params_b: float
    budget_gib: float | None
    weights_gib: float
    overhead_gib: float
    kv_pool_gib: float
    kv_bytes_per_token: int
    kv_gib_per_sequence: float
    num_blocks: int
    token_capacity: int
    max_model_len: int
    seq_len: int
    max_concurrency: int  # sequences of seq_len tokens that fit at once, per replica
    cluster_concurrency: int
    concurrency: int | None
    fits: bool
    verdict: str
    fixes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_dtype(dtype: str, model: ModelShape, gpu: GPU | None) -> tuple[str, str | None]:
    """The dtype the engine would use, and a warning when it had to change the request."""
    if gpu is None:
        return ("float32" if dtype == "auto" else dtype), None
    want = model.checkpoint_dtype if dtype == "auto" else dtype
    if want == "float32" and dtype == "auto":
        want = "bfloat16"
    if want == "bfloat16" and not gpu.bf16:
        cc = ".".join(map(str, gpu.compute_capability))
        return "float16", (f"{gpu.name} (compute capability {cc}) has no bfloat16 support; "
                           "float16 is used instead")
    return want, None


def make_plan(p: PlanInput) -> Plan:
    m, tp = p.model, p.tensor_parallel_size
    if tp < 1 or p.replicas < 1:
        raise ConfigError("tensor_parallel_size and replicas must be >= 1")
    shards = m.tp_shards(tp)  # refuses splits the engine cannot do
    kv_heads = max(s.kv_count for s in shards)
    dtype, warning = resolve_dtype(p.dtype, m, p.gpu)
    db = DTYPE_BYTES[dtype]
    max_len = p.max_model_len or min(m.max_position_embeddings, 8192)
    seq_len = min(p.seq_len or max_len, max_len)
    mnbt = p.max_num_batched_tokens or (  # the served engine's default token budget
        default_token_budget(int(p.gpu.memory_gib * GiB), p.gpu.name, serving=True) if p.gpu else 2048)
    weights = weight_bytes(m, db, p.quantization, tp)
    if p.kv_cache_dtype not in KV_DTYPE_BYTES:
        raise ConfigError(f"kv_cache_dtype must be one of {', '.join(KV_DTYPE_BYTES)}, got {p.kv_cache_dtype!r}",
                          param="kv_cache_dtype")
    kv_tok = m.kv_bytes_per_token(KV_DTYPE_BYTES[p.kv_cache_dtype] or db, tp, kv_heads)
    per_block = kv_tok * p.block_size
    if p.gpu is None:
        budget = None
        overhead = 0
        pool = int((p.kv_cache_memory or 1.0) * GiB)
    else:
        budget = p.gpu.memory_gib * GiB * p.gpu_memory_utilization
        overhead = int(CUDA_CONTEXT_GIB * GiB) + activation_bytes(m, mnbt, db) // tp
        pool = int(p.kv_cache_memory * GiB) if p.kv_cache_memory else int(budget - weights - overhead)
    blocks = max(0, pool // per_block)
    capacity = blocks * p.block_size
    blocks_per_seq = -(-seq_len // p.block_size)
    max_conc = blocks // blocks_per_seq if blocks_per_seq else 0
    per_seq_gib = blocks_per_seq * per_block / GiB

    fixes: list[str] = []
    device = "cpu" if p.gpu is None else f"{p.gpu.name} x{tp * p.replicas}"
    if p.gpu is not None and weights + overhead > budget:
        fits = False
        verdict = (f"does not load: weights {weights / GiB:.1f} GiB + overhead {overhead / GiB:.1f} GiB exceed "
                   f"the budget {budget / GiB:.1f} GiB ({p.gpu.memory_gib:.1f} GiB x {p.gpu_memory_utilization})")
        fixes += _weight_fixes(p, m, db, budget, overhead)
    elif max_conc < 1:
        fits = False
        verdict = (f"loads, but the KV pool ({pool / GiB:.2f} GiB, {capacity} tokens) cannot hold one sequence "
                   f"of {seq_len} tokens ({per_seq_gib:.2f} GiB)")
        fixes += _kv_fixes(p, m, per_seq_gib, pool, 1, seq_len)
    elif p.concurrency and p.concurrency > max_conc * p.replicas:
        fits = False
        need = p.concurrency * per_seq_gib
        verdict = (f"loads, but {p.concurrency} concurrent sequences of {seq_len} tokens need {need:.1f} GiB of KV "
                   f"({per_seq_gib:.3f} GiB each); the pool holds {pool / GiB:.2f} GiB per replica = "
                   f"{max_conc * p.replicas} such sequences; the rest wait in the queue")
        fixes += _kv_fixes(p, m, per_seq_gib, pool, -(-p.concurrency // p.replicas), seq_len)
    else:
        fits = True
        verdict = (f"fits: {max_conc * p.replicas} concurrent sequences of {seq_len} tokens "
                   f"({capacity} tokens of KV per replica)")
    return Plan(
        model=m.name, device=device, dtype=dtype, quantization=p.quantization, tensor_parallel_size=tp,
        replicas=p.replicas, kv_cache_dtype=p.kv_cache_dtype, gpus_needed=0 if p.gpu is None else tp * p.replicas,
        params_b=m.num_params() / 1e9, budget_gib=None if budget is None else budget / GiB,
        weights_gib=weights / GiB, overhead_gib=overhead / GiB, kv_pool_gib=max(pool, 0) / GiB,
        kv_bytes_per_token=kv_tok, kv_gib_per_sequence=per_seq_gib, num_blocks=blocks, token_capacity=capacity,
        max_model_len=max_len, seq_len=seq_len, max_concurrency=max_conc, cluster_concurrency=max_conc * p.replicas,
        concurrency=p.concurrency, fits=fits, verdict=verdict, fixes=fixes,
        warnings=[warning] if warning else [],
    )


def _weight_fixes(p: PlanInput, m: ModelShape, db: int, budget: float, overhead: int) -> list[str]:
    fixes = []
    for q in ("int8", "awq"):
        w = weight_bytes(m, db, q, p.tensor_parallel_size)
        if (p.quantization in (None, "none") or (p.quantization == "int8" and q == "awq")) and w + overhead < budget:
            fixes.append(f"quantize: --quantization {q} brings the weights to {w / GiB:.1f} GiB, "
                         f"leaving {(budget - w - overhead) / GiB:.1f} GiB for KV")
    for tp in (2, 4, 8):
        if tp > p.tensor_parallel_size and m.num_heads % tp == 0:
            w = weight_bytes(m, db, p.quantization, tp)
            if w + overhead < budget:
                fixes.append(f"split the model: --tensor-parallel-size {tp} puts {w / GiB:.1f} GiB of weights "
                             "on each GPU")
                break
    if p.gpu_memory_utilization < 0.95:
        fixes.append("raise --gpu-memory-utilization (only if nothing else uses this GPU)")
    bigger = [g for g in GPUS.values() if g.memory_gib > p.gpu.memory_gib * 1.2
              and weight_bytes(m, 2 if g.bf16 or db == 2 else db, p.quantization, p.tensor_parallel_size)
              + overhead < g.memory_gib * GiB * p.gpu_memory_utilization]
    if bigger:
        g = min(bigger, key=lambda g: g.memory_gib)
        fixes.append(f"use a bigger GPU: {g.name}")
    return fixes


def _kv_fixes(p: PlanInput, m: ModelShape, per_seq_gib: float, pool: int, want: int, seq_len: int) -> list[str]:
    fixes = []
    if per_seq_gib > 0:
        fit_len = int(pool / GiB / want / per_seq_gib * seq_len) // p.block_size * p.block_size
        if fit_len >= p.block_size:
            fixes.append(f"shorter context: --max-model-len {fit_len} lets {want} sequences fit per replica")
    if p.quantization in (None, "none") and p.gpu is not None:
        fixes.append("quantize the weights (--quantization int8 or awq; fp8 on Ada/Hopper) to free memory for KV")
    if p.kv_cache_dtype == "auto" and p.gpu is not None and p.gpu.compute_capability >= (8, 9):
        fixes.append("store the KV cache in fp8: --kv-cache-dtype fp8 holds twice the tokens")
    if p.gpu is not None:
        fixes.append(f"more replicas or GPUs: each replica holds {int(pool / GiB // max(per_seq_gib, 1e-9))} "
                     f"sequences of {seq_len} tokens")
        if p.gpu_memory_utilization < 0.95:
            fixes.append("raise --gpu-memory-utilization (only if nothing else uses this GPU)")
    else:
        fixes.append("give the KV cache more memory: --kv-cache-memory GiB")
    fixes.append("or accept queueing: requests beyond the fit wait, which shows as TTFT")
    return fixes


# -- start-up checks (the engine calls these before allocating anything) -------------
def available_host_memory() -> int:
    """Bytes the OS can still hand out (MemAvailable), or physical memory where /proc is absent."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory_before_load(shape: ModelShape, dtype_bytes: int, quantization: str | None, device_type: str,
                             kv_pool_bytes: int | None, gpu_total_bytes: int | None = None,
                             gpu_memory_utilization: float = 0.9, tp: int = 1) -> None:
    """Refuse to start, with numbers and the fix, when the weights (GPU) or weights + KV pool (CPU) cannot fit.
    With tensor parallelism: per GPU on CUDA; on CPU the ranks share host memory (T KV pools)."""
    from pagedserve.errors import OutOfMemoryError

    weights = weight_bytes(shape, dtype_bytes, quantization, tp)
    if device_type == "cuda":
        budget = gpu_total_bytes * gpu_memory_utilization
        if weights + CUDA_CONTEXT_GIB * GiB > budget:
            raise OutOfMemoryError(
                f"the model weights need {weights / GiB:.1f} GiB (+{CUDA_CONTEXT_GIB} GiB CUDA context) but the GPU "
                f"budget is {budget / GiB:.1f} GiB ({gpu_total_bytes / GiB:.1f} GiB x gpu_memory_utilization "
                f"{gpu_memory_utilization})",
                hint="quantize (--quantization int8/awq), split it (--tensor-parallel-size), use a bigger GPU, "
                     "or raise --gpu-memory-utilization; `pagedserve plan` shows the numbers")
        return
    avail = available_host_memory()
    weights, kv_pool_bytes = weights * tp, (kv_pool_bytes or 0) * tp
    need = weights + kv_pool_bytes
    if need > avail:
        raise OutOfMemoryError(
            f"the weights ({weights / GiB:.1f} GiB) and the KV cache ({(kv_pool_bytes or 0) / GiB:.1f} GiB) need "
            f"{need / GiB:.1f} GiB but only {avail / GiB:.1f} GiB of memory is available",
            hint="lower --kv-cache-memory (GiB) or free memory")


# -- model lookup --------------------------------------------------------------
def load_shape(model: str | None) -> ModelShape:
    """A preset name, a config.json / model dir / .gguf, a Hub id in the local cache, or None (default)."""
    if model in KNOWN_MODELS:
        return ModelShape.from_config(KNOWN_MODELS[model], model)
    lowered = {k.lower(): k for k in KNOWN_MODELS}
    short = {k.split("/")[-1].lower(): k for k in KNOWN_MODELS}
    key = (model or "").lower()
    if key in lowered or key in short:
        name = lowered.get(key) or short[key]
        return ModelShape.from_config(KNOWN_MODELS[name], name)
    from pagedserve.model.loader import read_hf_config, resolve_model_dir

    try:
        d = resolve_model_dir(model)
    except ConfigError as e:
        if model and not Path(model).exists():
            raise ConfigError(f"{e.message}; known presets: {', '.join(KNOWN_MODELS)}", hint=e.hint) from e
        raise
    return ModelShape.from_config(read_hf_config(d), model or "SmolLM2-135M-Instruct")


def find_gpu(name: str) -> GPU:
    g = GPUS.get(name.lower())
    if g is None:
        raise ConfigError(f"unknown GPU {name!r}; known: {', '.join(g.name for g in GPUS.values())}",
                          param="gpu", hint="or give --gpu-memory GiB")
    return g


# -- CLI ---------------------------------------------------------------------------
def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="will this model + KV cache fit this GPU at this concurrency?")
    p.add_argument("model", nargs="?", default=None,
                   help=f"model dir, config.json, .gguf or a preset ({', '.join(KNOWN_MODELS)}); default: embedded")
    p.add_argument("--gpu", default=None, help=f"one of {', '.join(g.name for g in GPUS.values())}, or 'cpu'")
    p.add_argument("--gpu-memory", type=float, default=None, help="GPU memory in GiB (instead of --gpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_BYTES])
    p.add_argument("--quantization", default=None, choices=["none", "int8", "fp8", "awq", "int4"])
    p.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_DTYPE_BYTES),
                   help="fp8: one byte per cached K/V value (twice the tokens)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-memory", type=float, default=None, help="KV pool in GiB (CPU; default 1)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=None, help="concurrent sequences you need")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens a typical sequence holds (prompt + output); default: max-model-len")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def plan_from_args(args: argparse.Namespace) -> Plan:
    shape = load_shape(args.model)
    if args.gpu_memory is not None:
        gpu = GPU(f"GPU-{args.gpu_memory:g}GiB", args.gpu_memory, (9, 0))
    elif args.gpu and args.gpu.lower() != "cpu":
        gpu = find_gpu(args.gpu)
    else:
        gpu = None
    if not 0 < args.gpu_memory_utilization <= 1:
        raise ConfigError(f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}")
    return make_plan(PlanInput(
        model=shape, gpu=gpu, dtype=args.dtype, quantization=args.quantization,
        gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_memory=args.kv_cache_memory,
        max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size, concurrency=args.concurrency, seq_len=args.seq_len, replicas=args.replicas,
        tensor_parallel_size=args.tensor_parallel_size, kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto")))


def format_plan(plan: Plan) -> str:
    rows = [
        ("model", f"{plan.model} ({plan.params_b:.2f} B params)"),
        ("device", f"{plan.device}, dtype {plan.dtype}"
                   + (f", quantization {plan.quantization}" if plan.quantization else "")
                   + (f", TP {plan.tensor_parallel_size}" if plan.tensor_parallel_size > 1 else "")),
    ]
    if plan.budget_gib is not None:
        rows.append(("budget per GPU", f"{plan.budget_gib:.2f} GiB"))
    rows += [
        ("weights" if plan.budget_gib is None else "weights per GPU", f"{plan.weights_gib:.2f} GiB"),
        ("runtime overhead", f"{plan.overhead_gib:.2f} GiB (CUDA context + activation peak)"
                             if plan.budget_gib is not None else "n/a on CPU"),
        ("KV pool", f"{plan.kv_pool_gib:.2f} GiB = {plan.num_blocks} blocks = {plan.token_capacity} tokens"),
        ("KV per token", f"{plan.kv_bytes_per_token / 1024:.1f} KiB"
                         + (f" ({plan.kv_cache_dtype})" if plan.kv_cache_dtype != "auto" else "")),
        ("KV per sequence", f"{plan.kv_gib_per_sequence * 1024:.1f} MiB at {plan.seq_len} tokens"),
        ("max concurrency", f"{plan.max_concurrency} per replica, {plan.cluster_concurrency} over "
                            f"{plan.replicas} replica(s) (sequences of {plan.seq_len} tokens)"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += [f"warning: {w}" for w in plan.warnings]
    lines.append(("OK   " if plan.fits else "NO   ") + plan.verdict)
    lines += [f"fix: {f}" for f in plan.fixes]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(format_plan(plan))
    return 0 if plan.fits else 1
