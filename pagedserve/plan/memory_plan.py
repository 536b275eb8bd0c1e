"""The plan: budget, weights, overhead, KV pool, and how many sequences fit; with fixes when they do not."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pagedserve.config import GiB, default_token_budget
from pagedserve.errors import ConfigError
from pagedserve.plan.gpus import CUDA_CONTEXT_GIB, GPU, GPUS
from pagedserve.plan.model_shapes import (DTYPE_BYTES, KV_DTYPE_BYTES, ModelShape, activation_bytes,
                                         weight_bytes)


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
    active_params_b: float  # per token: < params_b for mixture-of-experts models (top-k of the experts)
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
        params_b=m.num_params() / 1e9, active_params_b=m.active_params() / 1e9,
        budget_gib=None if budget is None else budget / GiB,
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
