"""`pagedserve generate "prompt"` and `pagedserve chat "message"`: one-shot completions on the offline engine."""
from __future__ import annotations

import argparse
import json
import sys


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine flags shared by generate/chat/serve; names mirror vLLM's."""
    p.add_argument("--model", dest="model_opt", default=None, help="HF dir, .gguf file or Hub id (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-memory", type=float, default=None, help="KV cache size in GiB (CPU default 1)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "gguf", "dummy"])
    p.add_argument("--enforce-eager", action="store_true", help="GPU: no CUDA graphs (debugging)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule and launch step N+1 while the GPU runs step N (default: on for one GPU, off "
                        "on CPU); --no-async-scheduling gives the synchronous step, for A/B runs")
    p.add_argument("--quantization", "-q", default=None, choices=["none", "int8", "fp8", "awq"],
                   help="weights: int8 or fp8 (quantize a bf16/fp32 checkpoint on load; fp8 needs compute "
                        "capability >= 8.9) or awq (pre-quantized int4 checkpoint); AWQ and fp8 checkpoints "
                        "are detected from config.json without this flag")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"],
                   help="KV cache storage: auto (the model's dtype) or fp8 (e4m3, per-tensor scale 1.0; "
                        "twice the tokens; compute capability >= 8.9)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split the model over N ranks (GPUs; on CPU, N processes sharing the cores)")
    p.add_argument("--speculative-config", default=None,
                   help='speculative decoding as JSON, vLLM\'s keys: \'{"method": "ngram", '
                        '"num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}\' '
                        '(see docs/speculative-decoding.md)')


def engine_kwargs(args: argparse.Namespace, model: str | None) -> dict:
    from pagedserve.engine.spec_decode.config import SpeculativeConfig

    spec = SpeculativeConfig.parse(args.speculative_config)  # a bad value fails here, before any loading
    return dict(speculative_config=None if spec is None else json.loads(args.speculative_config),
                model=model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                block_size=args.block_size, gpu_memory_utilization=args.gpu_memory_utilization,
                kv_cache_memory=args.kv_cache_memory, enable_prefix_caching=args.enable_prefix_caching,
                seed=args.seed, load_format=args.load_format, enforce_eager=args.enforce_eager,
                async_scheduling=args.async_scheduling, quantization=args.quantization, tensor_parallel_size=args.tensor_parallel_size,
                kv_cache_dtype=args.kv_cache_dtype)


def add_parser(sub) -> None:
    for name, helptext in (("generate", "complete a prompt"), ("chat", "answer one chat message")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("prompt", help="the prompt text ('-' reads standard input)")
        add_engine_args(p)
        p.add_argument("--max-tokens", type=int, default=128)
        p.add_argument("--temperature", type=float, default=0.0)
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--top-k", type=int, default=-1)
        p.add_argument("-n", type=int, default=1)
        p.add_argument("--stop", action="append", default=None)
        p.set_defaults(func=run, mode=name)


def run(args: argparse.Namespace) -> int:
    from pagedserve.llm import LLM
    from pagedserve.sampling_params import SamplingParams

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, n=args.n, stop=args.stop, seed=args.seed)
    max_len = args.max_model_len or 2048
    llm = LLM(**engine_kwargs(args, args.model_opt) | {"max_model_len": max_len})
    if args.mode == "chat":
        out = llm.chat([{"role": "user", "content": prompt}], params, use_tqdm=False)[0]
    else:
        out = llm.generate(prompt, params, use_tqdm=False)[0]
    for i, o in enumerate(out.outputs):
        if len(out.outputs) > 1:
            print(f"--- [{i}] ({o.finish_reason})")
        print(o.text)
    return 0
