"""Serving on one GPU, measured end to end: `pagedserve serve` + `pagedserve bench serve`.

    python benchmarks/gpu_serving.py                          # both parts, defaults below
    python benchmarks/gpu_serving.py --parts single --concurrency 1,32 --duration 5   # quick

Part `single`: one server with a Qwen2.5-7B-shaped model (dummy weights, bf16), a
closed-loop concurrency sweep 1 -> 600 (the seed's Q16 table on one H100), 128-token
prompts, 128 new tokens (ignore_eos). The vocab is cut to the tokenizer's (SmolLM2's
49,152; random weights must emit ids that decode to text), so the LM head is a third of
Qwen's: 7.2B parameters instead of 7.6B. Part `replicas`: `serve --replicas 4` of a
Qwen2.5-0.5B shape on the ONE GPU (each replica gets 0.85/4 of the memory) behind
the router, swept the same way: the cluster path (launcher, router, health checks) on
real hardware. Each level runs --duration seconds (no new requests after it).

Writes $OUT/gpu_serving/<part>.json (+ plots) via `pagedserve bench serve`, and a
summary table to stdout and $OUT/gpu_serving/summary.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_throughput import make_model_dir  # noqa: E402
from pagedserve.server.launch import ServerProcess  # noqa: E402


def dummy_model_dir(shape: str, tokenizer_dir: str) -> Path:
    """A dummy-weights model dir of `shape` with a real tokenizer (also used by bench_agreement.py)."""
    model_dir = make_model_dir(shape)
    for f in Path(tokenizer_dir).glob("tokenizer*"):  # a real tokenizer: the bench writes text prompts
        shutil.copy(f, model_dir / f.name)
    # Random weights emit any id of the model's vocab; ids the tokenizer lacks decode to no text, which the
    # bench rightly counts as a broken stream. So the vocab is cut to the tokenizer's (Qwen 152k -> 49k).
    from transformers import AutoTokenizer
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["vocab_size"] = len(AutoTokenizer.from_pretrained(model_dir))
    cfg_path.write_text(json.dumps(cfg))
    return model_dir


def run_part(name: str, shape: str, serve_extra: list[str], args, out: Path) -> dict:
    model_dir = dummy_model_dir(shape, args.tokenizer_dir)
    srv = ServerProcess(["--load-format", "dummy", "--served-model-name", shape, "--disable-log-requests",
                         "--max-num-seqs", str(args.max_num_seqs), *serve_extra], model=str(model_dir))
    print("$", " ".join(srv.cmd), flush=True)
    try:
        t0 = time.monotonic()
        srv.start().wait_ready(args.ready_timeout)  # /health: /v1/models answers while the model loads
        ready_s = time.monotonic() - t0
        bench = [sys.executable, "-m", "pagedserve.cli", "bench", "serve", "--url", srv.url, "--model", shape,
                 "--tokenizer", str(model_dir), "--concurrency", args.concurrency, "--duration", str(args.duration),
                 "--input-len", str(args.input_len), "--output-len", str(args.output_len), "--ignore-eos",
                 "--temperature", "0", "--warmup", "8", "--no-progress", "--save-json", str(out / f"{name}.json"),
                 "--plot", str(out / f"{name}_plots"), "--slo", args.slo]
        print("$", " ".join(bench), flush=True)
        subprocess.run(bench, check=True, timeout=args.part_timeout)
    finally:
        srv.terminate()
        (out / f"{name}_server.log").write_text(srv.output(last=400))
        srv.log.close()
        os.unlink(srv.log.name)
    summary = json.loads((out / f"{name}.json").read_text())
    return {"part": name, "shape": shape, "ready_seconds": ready_s, "serve_flags": serve_extra,
            "levels": [{k: v for k, v in lv.items() if k != "requests"} for lv in summary["levels"]],
            "knee": summary.get("knee")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="single,replicas")
    ap.add_argument("--concurrency", default="1,8,32,64,128,256,400,600")
    ap.add_argument("--replica-concurrency", default="1,32,128,256,512")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--single-shape", default="Qwen/Qwen2.5-7B-Instruct")
    ap.add_argument("--replica-shape", default="Qwen/Qwen2.5-0.5B-Instruct")
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--tokenizer-dir", default=None,
                    help="dir with tokenizer.json (default: the embedded default model's, SmolLM2)")
    ap.add_argument("--slo", default="ttft=2s,tpot=100ms")
    ap.add_argument("--ready-timeout", type=float, default=300)
    ap.add_argument("--part-timeout", type=float, default=900)
    args = ap.parse_args()
    if args.tokenizer_dir is None:
        from pagedserve.model.default_model import default_model_dir
        args.tokenizer_dir = str(default_model_dir())
    out = Path(os.environ.get("OUT", ROOT / "out")) / "gpu_serving"
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for part in args.parts.split(","):
        if part == "single":
            results.append(run_part("single", args.single_shape, ["--gpu-memory-utilization", "0.9"], args, out))
        elif part == "replicas":
            a = argparse.Namespace(**{**vars(args), "concurrency": args.replica_concurrency})
            share = round(0.85 / args.replicas, 3)
            results.append(run_part("replicas", args.replica_shape,
                                    ["--replicas", str(args.replicas), "--gpu-memory-utilization", str(share)], a, out))
        else:
            raise SystemExit(f"unknown part {part!r} (single, replicas)")
        (out / "summary.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
