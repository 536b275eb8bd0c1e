"""Per-step breakdown on the GPU: wall ms per step, GPU busy %, host ms per step, overlap on vs off.

    python benchmarks/step_profile.py                      # 7B shape, dummy weights, b=256 decode
    python benchmarks/step_profile.py --shape Qwen/Qwen2.5-0.5B-Instruct --batch 512
    python benchmarks/step_profile.py --dry-run            # CPU: tiny shape (checks the script)

A batch of `--batch` requests (128-token prompts) is prefilled, then `--steps` decode steps run
under torch.profiler. GPU busy = the sum of the kernels' device time over the wall time (streams
do not overlap here); host ms = time the engine's Python spends per step outside waiting for
the device (wall minus the time blocked in the token read-back or a synchronising copy, taken
from the profiler's CPU events). Writes step_profile.json to --out (default $OUT or ./out).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def measure(llm, batch: int, steps: int, prompt_len: int, on: bool) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from pagedserve import SamplingParams

    eng = llm.engine
    eng.async_scheduling = on
    p = SamplingParams(temperature=0, max_tokens=steps + 40, ignore_eos=True, detokenize=False)
    for i in range(batch):
        eng.add_request(f"{on}-{i}", None, p, prompt_token_ids=[(7 * i + j) % 1000 + 2 for j in range(prompt_len)])
    while eng.scheduler.waiting or any(s.num_computed < s.num_prompt_tokens
                                       for r in eng.scheduler.running for s in r.seqs):
        eng.step()  # prefill everything first: the profile is of decode steps
    for _ in range(5):
        eng.step()
    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            eng.step()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events) if cuda else 0.0
    blocked_us = sum(e.cpu_time_total for e in events
                     if e.key in ("cudaEventSynchronize", "cudaStreamSynchronize", "cudaDeviceSynchronize",
                                  "cudaMemcpyAsync", "aten::_local_scalar_dense", "aten::item"))
    for rid in list(eng.requests):
        eng.abort_request(rid)
    while eng.has_unfinished_requests():
        eng.step()
    ms = wall * 1000 / steps
    return {"async_scheduling": on, "batch": batch, "steps": steps, "wall_ms_per_step": ms,
            "gpu_ms_per_step": gpu_us / 1000 / steps, "gpu_busy": gpu_us / 1000 / steps / ms if cuda else None,
            "host_ms_per_step": max(0.0, ms - blocked_us / 1000 / steps), "tok_s": batch / (ms / 1000)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="Qwen/Qwen2.5-7B-Instruct")
    ap.add_argument("--tokenizer-dir", default=None)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from peer_vllm import model_dir

    from pagedserve import LLM

    if args.dry_run:
        mdir, kw = model_dir("tiny", args.tokenizer_dir), {"kv_cache_memory": 0.25}
        args.batch, args.steps, args.prompt_len = 4, 3, 16
    else:
        shape = next((k for k, v in {"7b": "Qwen/Qwen2.5-7B-Instruct", "0.5b": "Qwen/Qwen2.5-0.5B-Instruct"}.items()
                      if v == args.shape), "7b")
        mdir, kw = model_dir(shape, args.tokenizer_dir), {"gpu_memory_utilization": 0.85}
    llm = LLM(str(mdir), load_format="dummy", dtype="bfloat16" if not args.dry_run else "float32",
              max_model_len=1024, max_num_seqs=max(args.batch, 8), **kw)
    rows = [measure(llm, args.batch, args.steps, args.prompt_len, on) for on in (False, True, False, True)]
    print(f"{'overlap':>7} {'batch':>5} {'wall ms/step':>12} {'GPU ms/step':>11} {'GPU busy':>8} {'host ms':>7} {'tok/s':>9}")
    for r in rows:
        busy = f"{r['gpu_busy']:.0%}" if r["gpu_busy"] is not None else "-"
        print(f"{'on' if r['async_scheduling'] else 'off':>7} {r['batch']:>5} {r['wall_ms_per_step']:>12.2f} "
              f"{r['gpu_ms_per_step']:>11.2f} {busy:>8} {r['host_ms_per_step']:>7.2f} {r['tok_s']:>9,.0f}")
    out = Path(args.out or os.environ.get("OUT") or ROOT / "out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_profile.json").write_text(json.dumps({"shape": args.shape, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
