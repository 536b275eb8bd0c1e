"""`pagedserve plan MODEL --gpu H100-80GB ...`: print the memory plan (or its JSON)."""
from __future__ import annotations

import argparse
import json

from pagedserve.config import EngineConfig
from pagedserve.errors import ConfigError
from pagedserve.plan.gpus import GPU, GPUS, find_gpu
from pagedserve.plan.memory_plan import Plan, PlanInput, make_plan
from pagedserve.plan.model_shapes import DTYPE_BYTES, KNOWN_MODELS, KV_DTYPE_BYTES, load_shape


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="will this model + KV cache fit this GPU at this concurrency?")
    p.add_argument("model", nargs="?", default=None,
                   help=f"model dir, config.json, .gguf or a preset ({', '.join(KNOWN_MODELS)}); default: embedded")
    p.add_argument("--gpu", default=None, help=f"one of {', '.join(g.name for g in GPUS.values())}, or 'cpu'")
    p.add_argument("--gpu-memory", type=float, default=None, help="GPU memory in GiB (instead of --gpu)")
    d = EngineConfig  # the engine's defaults, so a plan without flags is the engine's start-up
    p.add_argument("--dtype", default=d.dtype, choices=["auto", *DTYPE_BYTES])
    p.add_argument("--quantization", default=None, choices=["none", "int8", "fp8", "awq", "int4"])
    p.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype, choices=list(KV_DTYPE_BYTES),
                   help="fp8: one byte per cached K/V value (twice the tokens)")
    p.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
    p.add_argument("--kv-cache-memory", type=float, default=None, help="KV pool in GiB (CPU; default 1)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--concurrency", type=int, default=None, help="concurrent sequences you need")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens a typical sequence holds (prompt + output); default: max-model-len")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--tensor-parallel-size", type=int, default=d.tensor_parallel_size)
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
        ("model", f"{plan.model} ({plan.params_b:.2f} B params"
                  + (f", {plan.active_params_b:.2f} B active per token)" if plan.active_params_b < plan.params_b
                     else ")")),
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
