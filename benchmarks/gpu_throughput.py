"""pagedserve vs Hugging Face transformers on one GPU, and both vs the roofline, in one run.

    python benchmarks/gpu_throughput.py                       # 7B and 0.5B shapes, default batches
    python benchmarks/gpu_throughput.py --shapes 0.5b --batches 1,32 --no-hf   # quick

Models are Qwen2.5-7B / Qwen2.5-0.5B shaped with random weights (`load_format="dummy"`
for pagedserve, `from_config` for HF): real architecture numbers, no download.
Workloads: fixed (128-token prompts, 128 new tokens, all requests at once) at each
batch size, and the seed's long tail (outputs 50-500 tokens) where HF's static
batch runs to the longest output and only the requested tokens count.

Roofline, per workload, from numbers measured in the same run: memory bandwidth
(a device-to-device copy) and bf16 matmul TFLOP/s. Every decode step must read
all weights plus every live sequence's KV; prefill must do 2 x params FLOPs per
token. The ceiling is the sum over steps of max(bytes / BW, flops / peak); we
report output tok/s and its share of that ceiling.

Prints a table; writes JSON to $OUT/gpu_throughput.json (else ./out/).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pagedserve.plan import KNOWN_MODELS, ModelShape  # noqa: E402

SHAPES = {"7b": "Qwen/Qwen2.5-7B-Instruct", "0.5b": "Qwen/Qwen2.5-0.5B-Instruct"}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="7b,0.5b")
    ap.add_argument("--batches", default="1,32,128,256,512")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--longtail", type=int, default=256, help="requests in the long-tail workload (0: skip)")
    ap.add_argument("--hf-max-batch", type=int, default=512, help="skip HF above this batch")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--quant", default="", help="also run pagedserve quantized: comma list of int8, awq")
    ap.add_argument("--ab-fused", action="store_true",
                    help="also run pagedserve with the fused Triton layer ops off (engine 'pagedserve_unfused')")
    ap.add_argument("--hf-cb", action="store_true", help="also try HF's continuous batching (generate_batch)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--out", default=None)
    return ap.parse_args()


# -- measured hardware peaks ---------------------------------------------------------
def _time_cuda(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def measure_peaks() -> dict:
    n = 1 << 30  # 1 GiB each way
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = _time_cuda(lambda: dst.copy_(src))
    bw = 2 * n / t  # read + write
    del src, dst
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    t = _time_cuda(lambda: a @ b)
    flops = 2 * 8192 ** 3 / t
    del a, b
    torch.cuda.empty_cache()
    return {"bandwidth_GBps": bw / 1e9, "bf16_TFLOPs": flops / 1e12}


def roofline_seconds(shape: ModelShape, prompt_lens: list[int], output_lens: list[int], peaks: dict) -> float:
    """Lower bound on the time to run the workload: prefill all prompts, then decode step by step."""
    bw, peak = peaks["bandwidth_GBps"] * 1e9, peaks["bf16_TFLOPs"] * 1e12
    wbytes = shape.num_params() * 2
    kv_tok = shape.kv_bytes_per_token(2)
    n_mat = shape.linear_params() + shape.vocab_size * shape.hidden_size  # matmul params per token
    att = 4 * shape.num_layers * shape.num_heads * shape.head_dim  # attention FLOPs per (query, key) pair
    total = max(wbytes / bw, sum(2 * n_mat * p + att * p * p / 2 for p in prompt_lens) / peak)
    steps = max(output_lens)
    for i in range(1, steps):
        live = [(p, o) for p, o in zip(prompt_lens, output_lens) if o > i]
        ctx = sum(p + i for p, _ in live)
        t_mem = (wbytes + ctx * kv_tok) / bw
        t_cmp = (2 * n_mat * len(live) + att * ctx) / peak
        total += max(t_mem, t_cmp)
    return total


# -- model directories -----------------------------------------------------------------
def make_model_dir(name: str) -> Path:
    """config.json for the shape plus a small tokenizer (only used for EOS ids; prompts are token ids)."""
    from tests.tiny_models import tokenizer

    d = Path(tempfile.mkdtemp(prefix="shape-"))
    cfg = dict(KNOWN_MODELS[name])
    cfg.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1e6,
               eos_token_id=0, bos_token_id=1)
    (d / "config.json").write_text(json.dumps(cfg))
    tokenizer().save_pretrained(d)
    return d


def workloads(batches: list[int], prompt_len: int, output_len: int, longtail: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    for b in batches:
        prompts = torch.randint(2, vocab, (b, prompt_len), generator=g).tolist()
        yield f"fixed b={b}", prompts, [output_len] * b
    if longtail:
        prompts = torch.randint(2, vocab, (longtail, prompt_len), generator=g).tolist()
        outs = torch.randint(50, 501, (longtail,), generator=g).tolist()
        yield f"longtail n={longtail}", prompts, outs


# -- runners -------------------------------------------------------------------------------
def run_pagedserve(model_dir: Path, loads, args, label: str = "pagedserve", quantization: str | None = None) -> list[dict]:
    from pagedserve import LLM, SamplingParams

    if quantization == "awq":  # a pre-quantized checkpoint's config; dummy weights fill the packed ints
        cfg = json.loads((model_dir / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
                                      "version": "gemm"}
        (model_dir / "config.json").write_text(json.dumps(cfg))
    llm = LLM(model=str(model_dir), load_format="dummy", dtype="bfloat16", max_model_len=1024,
              max_num_seqs=512, max_num_batched_tokens=8192, quantization=quantization,
              gpu_memory_utilization=args.gpu_memory_utilization)
    warm = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, detokenize=False)] * 8
    llm.generate([[5] * 32] * 8, warm, use_tqdm=False)
    rows = []
    for name, prompts, outs in loads:
        params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True, detokenize=False) for o in outs]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        got = sum(len(r.outputs[0].token_ids) for r in res)
        assert got == sum(outs), (got, sum(outs))
        ttft = sorted(r.metrics.ttft for r in res)
        rows.append({"workload": name, "engine": label, "seconds": dt, "output_tokens": got,
                     "tok_s": got / dt, "ttft_p50_s": ttft[len(ttft) // 2]})
        print(f"  {label} {name}: {got / dt:,.0f} tok/s", flush=True)
    eng = llm.engine
    info = {"num_kv_blocks": eng.num_kv_blocks, "quantization": quantization,
            "weights_GiB": sum(p.numel() * p.element_size() for p in eng.model.parameters()) / 2**30, "attention_backend": type(eng.model.layers[0].self_attn.backend).__name__}
    del llm, eng
    gc.collect()
    torch.cuda.empty_cache()
    return rows, info


def run_hf(name: str, loads, args) -> list[dict]:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    cfg = dict(KNOWN_MODELS[name])
    cfg.pop("torch_dtype", None)
    hf_cfg = AutoConfig.for_model("qwen2", **cfg)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.eval()
    rows = []
    for wname, prompts, outs in loads:
        b = len(prompts)
        if b > args.hf_max_batch:
            continue
        max_new = max(outs)
        gen = GenerationConfig(max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
        ids = torch.tensor(prompts, device="cuda")
        try:
            with torch.inference_mode():
                model.generate(ids[:1, :16], generation_config=GenerationConfig(
                    max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0))
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
                torch.cuda.synchronize()
                dt = time.perf_counter() - t0
        except torch.OutOfMemoryError:
            rows.append({"workload": wname, "engine": "hf_generate", "error": "out of memory"})
            torch.cuda.empty_cache()
            continue
        assert out.shape[1] - ids.shape[1] == max_new
        useful = sum(outs)  # a static batch runs to the longest output; only requested tokens count
        rows.append({"workload": wname, "engine": "hf_generate", "seconds": dt, "output_tokens": useful,
                     "tok_s": useful / dt})
        print(f"  hf generate {wname}: {useful / dt:,.0f} tok/s", flush=True)
        if args.hf_cb and hasattr(model, "generate_batch"):
            try:
                cb = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=None, pad_token_id=0)
                t0 = time.perf_counter()
                res = model.generate_batch(inputs=prompts, generation_config=cb)
                torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                n = sum(len(r.generated_tokens) for r in res.values())
                rows.append({"workload": wname, "engine": "hf_generate_batch", "seconds": dt, "output_tokens": n,
                             "tok_s": n / dt})
                print(f"  hf generate_batch {wname}: {n / dt:,.0f} tok/s", flush=True)
            except Exception as e:  # an experimental API: report, keep going
                rows.append({"workload": wname, "engine": "hf_generate_batch", "error": repr(e)[:300]})
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def main() -> int:
    args = parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    out_dir = Path(args.out or os.environ.get("OUT") or ROOT / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    peaks = measure_peaks()
    print(f"GPU {torch.cuda.get_device_name()}: copy bandwidth {peaks['bandwidth_GBps']:.0f} GB/s, "
          f"bf16 matmul {peaks['bf16_TFLOPs']:.0f} TFLOP/s", flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    report = {"device": torch.cuda.get_device_name(), "peaks": peaks, "torch": torch.__version__, "results": []}
    for key in args.shapes.split(","):
        name = SHAPES[key]
        shape = ModelShape.from_config(KNOWN_MODELS[name], name)
        loads = list(workloads(batches, args.prompt_len, args.output_len, args.longtail, shape.vocab_size))
        print(f"== {name} ({shape.num_params() / 1e9:.2f} B params)", flush=True)
        rows = []
        try:
            ps_rows, info = run_pagedserve(make_model_dir(name), loads, args)
            rows += ps_rows
            report.setdefault("engine_info", {})[key] = info
        except Exception:
            traceback.print_exc()
            rows.append({"engine": "pagedserve", "error": traceback.format_exc()[-500:]})
        for q in filter(None, args.quant.split(",")):
            try:
                q_rows, q_info = run_pagedserve(make_model_dir(name), loads, args, f"pagedserve_{q}", q)
                rows += q_rows
                report.setdefault("engine_info", {})[f"{key}_{q}"] = q_info
            except Exception:
                traceback.print_exc()
                rows.append({"engine": f"pagedserve_{q}", "error": traceback.format_exc()[-500:]})
        if args.ab_fused:
            from pagedserve.model.kernels import fused_ops
            fused_ops.ENABLED = False  # read at CUDA-graph capture: a new engine is needed, and made here
            try:
                rows += run_pagedserve(make_model_dir(name), loads, args, "pagedserve_unfused")[0]
            except Exception:
                traceback.print_exc()
            finally:
                fused_ops.ENABLED = True
        if not args.no_hf:
            try:
                rows += run_hf(name, loads, args)
            except Exception:
                traceback.print_exc()
                rows.append({"engine": "hf_generate", "error": traceback.format_exc()[-500:]})
        for r in rows:
            r["shape"] = key
            wl = next((w for w in loads if w[0] == r.get("workload")), None)
            if wl and "tok_s" in r:
                _, prompts, outs = wl
                ceiling = sum(outs) / roofline_seconds(shape, [len(p) for p in prompts], outs, peaks)
                r["roofline_tok_s"] = ceiling
                r["pct_of_roofline"] = 100 * r["tok_s"] / ceiling
        report["results"] += rows
    (out_dir / "gpu_throughput.json").write_text(json.dumps(report, indent=2))

    print(f"\n{'shape':<5} {'workload':<16} {'engine':<18} {'tok/s':>10} {'vs HF':>7} {'roofline':>10} {'% roof':>7}")
    res = report["results"]
    for r in res:
        if "tok_s" not in r:
            print(f"{r.get('shape', ''):<5} {r.get('workload', ''):<16} {r['engine']:<18} error: "
                  f"{r.get('error', '')[:60]}")
            continue
        hf = next((h for h in res if h.get("engine") == "hf_generate" and h.get("shape") == r["shape"]
                   and h.get("workload") == r["workload"] and "tok_s" in h), None)
        ratio = f"{r['tok_s'] / hf['tok_s']:.2f}x" if hf else "-"
        print(f"{r['shape']:<5} {r['workload']:<16} {r['engine']:<18} {r['tok_s']:>10,.0f} {ratio:>7} "
              f"{r['roofline_tok_s']:>10,.0f} {r['pct_of_roofline']:>6.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
