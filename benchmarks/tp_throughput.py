"""Data parallel vs tensor parallel on one multi-GPU box: the same GPUs as R replicas x T ranks.

    python benchmarks/tp_throughput.py                      # 7B shape, every split that fits the GPUs
    python benchmarks/tp_throughput.py --concurrency 1,64,512 --skip-offline
    python benchmarks/tp_throughput.py --dry-run            # CPU, tiny model: checks the plumbing only

1. Serving: `pagedserve serve --replicas R --tensor-parallel-size T` (the router in front) for every
   split of the G GPUs used (G = the largest of 4, 2, 1 that is visible): 4x1 vs 2x2 vs 1x4 on 4 GPUs.
   Each is swept with `pagedserve bench serve` over closed-loop concurrency levels (up to 512):
   output tok/s, TTFT and TPOT percentiles per level.
2. Offline: one `LLM(tensor_parallel_size=T)` per T in 1, 2, 4 (as fits), a batch of prompts
   through `generate`: output tok/s. Each T runs in a fresh process.

The model is a 7B-shaped Qwen2 (Qwen2.5-7B-Instruct's config, 28 query / 4 KV heads) with random
weights (`--load-format dummy`): real shapes, no download. Prints tables; writes JSON to
--out (default $OUT/tp_throughput.json, else ./out/tp_throughput.json).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pagedserve.ports import free_port  # noqa: E402

SHAPE = "Qwen/Qwen2.5-7B-Instruct"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default=SHAPE, help="a preset of `pagedserve plan` (default: the 7B shape)")
    ap.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all visible, at most 4)")
    ap.add_argument("--concurrency", default="1,8,32,128,256,512")
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--num-prompts", type=int, default=None, help="requests per level (default: bench's)")
    ap.add_argument("--offline-batch", type=int, default=256, help="prompts in the offline run")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--skip-serving", action="store_true")
    ap.add_argument("--skip-offline", action="store_true")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, a tiny random model, 2 'devices', tiny loads: exercises every step in a minute")
    ap.add_argument("--out", default=None)
    ap.add_argument("--offline-child", type=int, default=None, help=argparse.SUPPRESS)  # internal: one offline run
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.concurrency_levels = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
    if not args.concurrency_levels or min(args.concurrency_levels) < 1:
        ap.error("--concurrency needs positive integers, e.g. 1,8,64")
    if args.dry_run:
        args.concurrency_levels = [1, 4]
        args.input_len, args.output_len, args.offline_batch = 16, 8, 8
        args.num_prompts = args.num_prompts or 8
        args.max_model_len = 256
    return args


def visible_devices(args) -> int:
    if args.dry_run:
        return 2
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def splits(gpus: int) -> list[tuple[int, int]]:
    """(replicas, tp) pairs over the largest of 4/2/1 GPUs available: DP first, then wider TP."""
    total = next((g for g in (4, 2, 1) if g <= gpus), 0)
    return [(total // t, t) for t in (1, 2, 4) if t <= total]


def make_model_dir(args) -> Path:
    """config.json of the shape + the embedded model's tokenizer (the one `bench serve` counts with;
    its 49k ids fit any of these vocabularies)."""
    from transformers import AutoTokenizer

    from pagedserve.model.default_model import default_model_dir
    from pagedserve.plan.model_shapes import KNOWN_MODELS

    d = Path(tempfile.mkdtemp(prefix="tp-shape-"))
    if args.dry_run:  # tiny: 2 layers, 4 query / 2 KV heads
        cfg = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    else:
        cfg = dict(KNOWN_MODELS[args.shape])
    cfg.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1e6,
               eos_token_id=0, bos_token_id=1)
    (d / "config.json").write_text(json.dumps(cfg))
    AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(d)
    return d


def engine_flags(args) -> list[str]:
    flags = ["--load-format", "dummy", "--max-model-len", str(args.max_model_len), "--max-num-seqs", "512"]
    if args.dry_run:
        return flags + ["--device", "cpu", "--kv-cache-memory", "0.05", "--max-num-seqs", "16"]
    return flags + ["--dtype", "bfloat16", "--gpu-memory-utilization", str(args.gpu_memory_utilization)]


# -- serving ---------------------------------------------------------------------------------------
def wait_all_healthy(url: str, proc: subprocess.Popen, timeout: float = 1800) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited with code {proc.returncode}")
        try:
            h = httpx.get(url + "/health", timeout=5)
            body = h.json()
            # The router reports its backends; with --replicas 1 `serve` is a single server (no router).
            if h.status_code == 200 and body.get("healthy_backends", 1) == body.get("backends", 1):
                return
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(1)
    raise TimeoutError(f"replicas not all healthy after {timeout:.0f}s")


def run_serving(args, model_dir: Path, replicas: int, tp: int, out_dir: Path) -> list[dict]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(out_dir / f"serve_{replicas}x{tp}.log", "w")
    cmd = [sys.executable, "-m", "pagedserve.cli", "serve", str(model_dir), *engine_flags(args), "--port", str(port),
           "--replicas", str(replicas), "--tensor-parallel-size", str(tp), "--disable-log-requests"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_all_healthy(url, proc)
        res = out_dir / f"bench_{replicas}x{tp}.json"
        bench = [sys.executable, "-m", "pagedserve.cli", "bench", "serve", "--url", url, "--no-progress",
                 "--concurrency", ",".join(map(str, args.concurrency_levels)), "--input-len", str(args.input_len),
                 "--output-len", str(args.output_len), "--ignore-eos",
                 "--save-json", str(res)]
        if args.num_prompts:
            bench += ["--num-prompts", str(args.num_prompts)]
        subprocess.run(bench, check=True, stdout=subprocess.DEVNULL if args.dry_run else None)
        doc = json.loads(res.read_text())
        rows = []
        for lv in doc["levels"]:
            s = lv["summary"]
            rows.append({"split": f"{replicas}x{tp}", "replicas": replicas, "tp": tp, "concurrency": lv["load"],
                         "output_tok_s": s["output_throughput"], "ttft_p50_ms": s["ttft_ms"]["p50"],
                         "ttft_p99_ms": s["ttft_ms"]["p99"], "tpot_p50_ms": (s.get("tpot_ms") or {}).get("p50")})
        return rows
    finally:
        proc.terminate()
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()


# -- offline ---------------------------------------------------------------------------------------
def offline_child(args) -> None:
    """One offline run in this (fresh) process; prints one JSON line."""
    import random

    from pagedserve import LLM, SamplingParams

    kw = dict(load_format="dummy", max_model_len=args.max_model_len, max_num_seqs=512,
              tensor_parallel_size=args.offline_child)
    kw |= (dict(device="cpu", kv_cache_memory=0.05, max_num_seqs=16) if args.dry_run else
           dict(dtype="bfloat16", gpu_memory_utilization=args.gpu_memory_utilization))
    llm = LLM(args.model_dir, **kw)
    vocab = llm.engine.args.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(2, vocab) for _ in range(args.input_len)] for _ in range(args.offline_batch)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True, detokenize=False)
    llm.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    t0 = time.perf_counter()
    res = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    got = sum(len(r.outputs[0].token_ids) for r in res)
    print(json.dumps({"tp": args.offline_child, "seconds": dt, "output_tokens": got, "output_tok_s": got / dt,
                      "num_kv_blocks": llm.engine.num_kv_blocks}), flush=True)
    if llm.engine.tp is not None:
        llm.engine.tp.executor.shutdown()


def run_offline(args, model_dir: Path, tp: int) -> dict:
    cmd = [sys.executable, __file__, "--offline-child", str(tp), "--model-dir", str(model_dir),
           "--max-model-len", str(args.max_model_len), "--input-len", str(args.input_len),
           "--output-len", str(args.output_len), "--offline-batch", str(args.offline_batch),
           "--gpu-memory-utilization", str(args.gpu_memory_utilization)] + (["--dry-run"] if args.dry_run else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"tp": tp, "error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"rc {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def print_table(title: str, rows: list[dict], cols: list[str]) -> None:
    print(f"\n{title}")
    print("  ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print("  ".join(f"{r.get(c):>14.1f}" if isinstance(r.get(c), float) else f"{str(r.get(c)):>14}" for c in cols))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.offline_child is not None:
        offline_child(args)
        return 0
    gpus = args.gpus if args.gpus is not None else visible_devices(args)
    plan = splits(min(gpus, 4))
    if not plan:
        print("no GPU visible: nothing to compare (use --dry-run to check the script on CPU)", file=sys.stderr)
        return 1
    out = Path(args.out or Path(os.environ.get("OUT", "out")) / "tp_throughput.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    model_dir = make_model_dir(args)
    doc = {"shape": "tiny qwen2 (dry run)" if args.dry_run else args.shape, "gpus": gpus, "splits": plan,
           "args": {k: v for k, v in vars(args).items() if k not in ("offline_child", "model_dir")},
           "serving": [], "offline": []}
    if not args.skip_serving:
        for r, t in plan:
            print(f"serving {r} replica(s) x TP {t} ...", flush=True)
            doc["serving"] += run_serving(args, model_dir, r, t, out.parent)
            out.write_text(json.dumps(doc, indent=1))
        print_table("serving (router + replicas), output tok/s by concurrency", doc["serving"],
                    ["split", "concurrency", "output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms"])
    if not args.skip_offline:
        for _, t in plan:
            print(f"offline TP {t} ...", flush=True)
            doc["offline"].append(run_offline(args, model_dir, t))
            out.write_text(json.dumps(doc, indent=1))
        print_table(f"offline, {args.offline_batch} prompts x {args.input_len} in / {args.output_len} out",
                    doc["offline"], ["tp", "output_tok_s", "seconds", "num_kv_blocks", "error"])
    out.write_text(json.dumps(doc, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
