"""Where one offline workload's GPU time goes, kernel by kernel: pagedserve or vLLM, same shapes.

    python benchmarks/kernel_split.py pagedserve ctx4k64,b32      # 7B shape, dummy weights
    python benchmarks/kernel_split.py vllm ctx4k64,b32             # vLLM importable (peer_vllm.py's notes)
    python benchmarks/kernel_split.py vllm b1,b32 --quantization fp8 # either engine, vLLM's option names
    python benchmarks/kernel_split.py pagedserve b4 --dry-run      # CPU: tiny shape, CPU kernels
    python benchmarks/kernel_split.py pagedserve b1,b32 --shape qwen3-30b-a3b --quantization fp8  # MoE

Workloads: `bN` = N prompts of 128 tokens, 128 new; `ctx4kN` = N prompts of 4,096 tokens, 256 new.
Each workload runs once untimed-by-profiler (its tok/s is `tok_s_plain`) and once under
torch.profiler with CUDA activity only, on fresh prompts (no prefix-cache hits). Kernels are
summed by name and bucketed by name patterns (`by_cat_ms`); vLLM's FlashAttention kernels are
CUTLASS kernels and land in `attn` by the `flash` pattern, checked first. This is how stop 18
found that both engines spend the same time in the same cuBLAS kernels and that the 4K-prompt gap
is prefill attention (README, Benchmarks). Writes kernel_split_<engine>[_<quant>]_<workload>.json to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CATEGORIES = [  # first match wins
    # MoE expert GEMMs (ours: _moe_gate_up / _moe_down; vLLM: fused_moe_kernel), then the routing around them
    ("moe_gemm", r"fused_moe|_moe_gate_up|_moe_down"),
    ("moe_route", r"moe_align|sort_expert|topk|gating|moe_sum|radixSort|searchsorted|scatter_add"),
    ("attn", r"flash|attn|attention|_decode|_prefill|fmha"),
    ("gemm", r"gemm|cutlass|nvjet|cublas|xmma|matmul|_w8a8|_awq|splitKreduce|addmm|mm_"),
    ("norm", r"norm"),
    ("act", r"silu|act_and_mul|gelu"),
    ("rope", r"rope|rotary"),
    ("kv_write", r"write_kv|reshape_and_cache"),
    ("memcpy", r"Memcpy|Memset"),
]


def workload(name: str, vocab: int, seed: int) -> tuple[list[list[int]], int]:
    m = re.fullmatch(r"(b|ctx4k)(\d+)", name)
    if not m:
        raise SystemExit(f"unknown workload {name!r}: use bN or ctx4kN")
    n, (plen, olen) = int(m.group(2)), ((128, 128) if m.group(1) == "b" else (4096, 256))
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(plen)] for _ in range(n)], olen


def split(events, cuda: bool) -> tuple[dict[str, float], dict[str, list]]:
    per_kernel: dict[str, list] = {}
    for e in events:
        if (e.device_type.name == "CUDA") if cuda else (e.device_type.name == "CPU" and not e.cpu_parent):
            t = (e.device_time if cuda else e.cpu_time_total) / 1e3
            rec = per_kernel.setdefault(e.name, [0.0, 0])
            rec[0] += t
            rec[1] += 1
    cats = {c: 0.0 for c, _ in CATEGORIES} | {"other": 0.0}
    for name, (ms, _) in per_kernel.items():
        cat = next((c for c, rx in CATEGORIES if re.search(rx, name, re.I)), "other")
        cats[cat] += ms
    return cats, per_kernel


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine", choices=["pagedserve", "vllm"])
    ap.add_argument("workloads", help="comma-separated: bN, ctx4kN")
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--tokenizer-dir", default=None)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--quantization", default=None, help="e.g. fp8 (both engines take vLLM's names)")
    ap.add_argument("--kv-cache-dtype", default=None, help="e.g. fp8")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # vLLM's kernels in this process
    import torch
    from torch.profiler import ProfilerActivity, profile

    from peer_vllm import _sync, model_dir

    cuda = torch.cuda.is_available() and not a.dry_run
    mdir = str(model_dir("tiny" if a.dry_run else a.shape, a.tokenizer_dir))
    vocab = json.loads(Path(mdir, "config.json").read_text())["vocab_size"]
    kw = dict(model=mdir, load_format="dummy", dtype="bfloat16", max_model_len=4096 + 256 + 64, max_num_seqs=512)
    if cuda:
        kw["gpu_memory_utilization"] = a.gpu_memory_utilization
    kw.update({k: v for k, v in (("quantization", a.quantization), ("kv_cache_dtype", a.kv_cache_dtype)) if v})
    if a.engine == "pagedserve":
        from pagedserve import LLM, SamplingParams

        llm = LLM(**kw)
    else:
        from vllm import LLM, SamplingParams

        llm = LLM(**kw, seed=0)

    def run(prompts: list[list[int]], olen: int) -> float:
        sp = SamplingParams(temperature=0, max_tokens=olen, ignore_eos=True, detokenize=False)
        _sync()
        t = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in prompts], [sp] * len(prompts), use_tqdm=False)
        _sync()
        return time.perf_counter() - t

    run([[5] * 32] * 8, 8)  # warm-up
    out_dir = Path(a.out or os.environ.get("OUT") or ROOT / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(a.workloads.split(",")):
        prompts, olen = workload(name, vocab, 2 * i)
        plain = run(prompts, olen)
        prompts, olen = workload(name, vocab, 2 * i + 1)  # fresh prompts: no prefix-cache hits
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            wall = run(prompts, olen)
        cats, per_kernel = split(prof.events(), cuda)
        top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:a.top]
        res = {"engine": a.engine, "quantization": a.quantization, "kv_cache_dtype": a.kv_cache_dtype,
               "workload": name, "tok_s_plain": len(prompts) * olen / plain, "wall_s": wall,
               "kernel_ms": sum(v[0] for v in per_kernel.values()), "by_cat_ms": cats,
               "top": [(k[:160], round(v[0], 2), v[1]) for k, v in top]}
        print(f"\n{a.engine} {name}: {res['tok_s_plain']:,.0f} tok/s, profiled wall {wall:.3f} s, "
              f"kernels {res['kernel_ms']:,.1f} ms")
        print("  " + ", ".join(f"{c} {ms:,.1f}" for c, ms in cats.items()))
        for k, ms, n in res["top"]:
            print(f"  {ms:10.1f} ms {n:7d}  {k[:110]}")
        tag = "_".join(filter(None, (a.engine, a.quantization, a.kv_cache_dtype and f"kv{a.kv_cache_dtype}", name)))
        (out_dir / f"kernel_split_{tag}.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
