#!/usr/bin/env python
"""CPU: does `torch.compile` of the model's elementwise work pay on the embedded default (issue 17)?

Each mode runs in its own process (a fresh compile cache is not guaranteed across modes, so the start-up
cost shows): the default model in fp32, one warm-up pass over the batch sizes, then greedy decode of 32
tokens after 128-token prompts at batch 1 and 32 (best of 2). Modes:
* eager: as served;
* norm: every RMSNorm's forward and add_forward compiled (inductor, dynamic shapes);
* mlp: every MLP's forward compiled, the oneDNN packed linears inside it;
* mlp_frozen: the MLPs' linears left as plain `nn.Linear` (the others packed as served) and every MLP
  compiled with inductor's freezing, so inductor packs the weights for oneDNN itself and fuses
  SiLU-and-mul around the GEMMs (what a whole-model `torch.compile` on CPU does).

    python benchmarks/cpu_compile.py                       # all modes; writes results/cpu_compile.json
    python benchmarks/cpu_compile.py --modes eager,norm
    python benchmarks/cpu_compile.py --modes eager,mlp_frozen,eager --out benchmarks/results/cpu_compile_frozen.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_mode(mode: str) -> dict:
    import torch

    from pagedserve import LLM, SamplingParams
    from pagedserve.model.layers.mlp import MLP
    from pagedserve.model.layers.norm import RMSNorm
    from pagedserve.model.layers.self_attention import Attention

    t0 = time.perf_counter()
    if mode == "mlp_frozen":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
    llm = LLM(max_model_len=512, kv_cache_memory=0.05)
    if mode == "mlp_frozen":  # the engine started with plain linears: pack all but the MLPs' as served
        from pagedserve.model.runner import OneDNNLinear, use_onednn_linears

        for mod in list(llm.engine.model.modules()):
            if isinstance(mod, Attention):
                use_onednn_linears(mod)
            if getattr(mod, "lm_head", False) is None and hasattr(mod, "embed_tokens"):
                mod.lm_head = OneDNNLinear(mod.embed_tokens.weight)
    for mod in llm.engine.model.modules():
        if mode in ("mlp", "mlp_frozen") and isinstance(mod, MLP):
            mod.forward = torch.compile(mod.forward, dynamic=True)
        if mode == "norm" and isinstance(mod, RMSNorm):
            mod.forward = torch.compile(mod.forward, dynamic=True)
            mod.add_forward = torch.compile(mod.add_forward, dynamic=True)
    load_s = time.perf_counter() - t0
    short = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, detokenize=False)
    t1 = time.perf_counter()
    for b in (2, 32, 1):  # compile (or warm) every shape the timed runs use
        llm.generate([[5 + i + j for i in range(128)] for j in range(b)], short, use_tqdm=False)
    warm_s = time.perf_counter() - t1
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, detokenize=False)
    out = {"mode": mode, "load_s": load_s, "warmup_s": warm_s, "threads": torch.get_num_threads()}
    for b in (1, 32):
        best = 0.0
        for r in range(2):
            prompts = [[9 + 50 * r + i + j for i in range(128)] for j in range(b)]
            t = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            best = max(best, 32 * b / (time.perf_counter() - t))
        out[f"b{b}_tok_s"] = best
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="eager,norm,mlp")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: run one mode, print JSON
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_compile.json"))
    args = p.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_mode(args.one)), flush=True)
        return 0
    env = dict(os.environ)
    lib = Path(sys.prefix) / "lib" / "libiomp5.so"  # as `serve` runs the engine (pagedserve/runtime.py)
    if lib.exists() and "libiomp5" not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = f"{lib}:{env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else str(lib)
        env.setdefault("KMP_BLOCKTIME", "1")
    rows = []
    for mode in args.modes.split(","):
        child_env = dict(env, PAGEDSERVE_ONEDNN="0") if mode == "mlp_frozen" else env
        r = subprocess.run([sys.executable, __file__, "--one", mode], capture_output=True, text=True, env=child_env)
        line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            lines = (r.stderr or "").splitlines()
            err = [x for x in lines if "InductorError" in x or "LoweringException" in x] or \
                  [x for x in lines if "Error" in x or "Exception" in x]
            rows.append({"mode": mode, "error": (err[-1].strip() if err else f"exit {r.returncode}")[:300]})
        else:
            rows.append(json.loads(line[len("RESULT "):]))
    print(f"{'mode':<10} {'load s':>7} {'warm-up s':>10} {'b=1 tok/s':>10} {'b=32 tok/s':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:<10} failed: {r['error']}")
        else:
            print(f"{r['mode']:<10} {r['load_s']:>7.1f} {r['warmup_s']:>10.1f} {r['b1_tok_s']:>10.1f} "
                  f"{r['b32_tok_s']:>11.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "cpus": os.cpu_count()}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
