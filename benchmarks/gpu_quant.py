#!/usr/bin/env python
"""GPU: quantization at speed and capacity, 7B shape (Qwen2.5-7B, dummy weights), in one run.

The GEMMs alone (every projection, M = 1..2048, against bf16 cuBLAS, and the tile sweep behind the
kernel tables): benchmarks/quant_tile_sweep.py.

The engines: for each method (bf16, fp8, fp8 weights + fp8 KV cache, int8, awq) one engine (max_model_len
4096) runs 128-token prompts -> 128 greedy tokens at each batch size (all requests at once), and reports
output tok/s, weight GiB, KV blocks and the number of 4096-token contexts the KV cache holds. Quality
against bf16 (same dummy weights, so not for AWQ, whose packed ints are random): relative logit error
||l - l_bf16|| / ||l_bf16|| over a 4 x 256-token prefill, and teacher-forced greedy agreement with bf16's
64-token continuations (random weights: near-flat logits make this a harsh test).

    python benchmarks/gpu_quant.py --out $OUT/gpu_quant.json          # full run, ~4 min on an H200
    python benchmarks/gpu_quant.py --methods bf16,fp8 --batches 1,256
    python benchmarks/gpu_quant.py --dry-run                          # CPU: tiny shape, checks the script
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pagedserve.plan.model_shapes import KNOWN_MODELS  # noqa: E402

SHAPE = "Qwen/Qwen2.5-7B-Instruct"
TINY = dict(vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)
METHODS = {  # name -> (quantization, kv_cache_dtype)
    "bf16": (None, "auto"), "fp8": ("fp8", "auto"), "fp8_kv": ("fp8", "fp8"), "int8": ("int8", "auto"),
    "awq": ("awq", "auto"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--batches", default="1,32,256,512", help="engine batch sizes")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--context", type=int, default=4096, help="max_model_len; concurrency is counted at this length")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--dry-run", action="store_true", help="CPU: tiny shape, few steps (checks the script)")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/gpu_quant.json or benchmarks/results/)")
    a = p.parse_args(argv)
    a.methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in a.methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {list(METHODS)}")
    a.batches = [int(b) for b in a.batches.split(",")]
    if a.dry_run:
        a.batches = [1, 4]
        a.prompt_len, a.output_len, a.context = 16, 4, 256
    return a


def shape_config(dry: bool) -> dict:
    cfg = dict(TINY if dry else KNOWN_MODELS[SHAPE])
    cfg.pop("torch_dtype", None)
    return cfg


# -- engines ------------------------------------------------------------------------------------
def make_model_dir(dry: bool, awq: bool) -> Path:
    from tests.tiny_models import tokenizer

    d = Path(tempfile.mkdtemp(prefix="quant-shape-"))
    cfg = shape_config(dry)
    cfg.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1e6,
               eos_token_id=0, bos_token_id=1)
    if awq:  # a pre-quantized checkpoint's config; dummy weights fill the packed ints
        cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
                                      "version": "gemm"}
    (d / "config.json").write_text(json.dumps(cfg))
    tokenizer().save_pretrained(d)
    return d


def engine_part(args, dev) -> dict:
    from pagedserve import LLM, SamplingParams
    from pagedserve.bench.quality import prefill_logits, teacher_forced_agreement

    cuda = dev.type == "cuda"
    vocab = shape_config(args.dry_run)["vocab_size"]
    g = torch.Generator().manual_seed(0)
    qual_prompts = torch.randint(2, vocab, (4, 32 if args.dry_run else 256), generator=g).tolist()
    ref_logits, ref_cont, out = None, None, {}
    if "bf16" not in args.methods:
        print("(quality needs bf16 in --methods: skipped)")
    for method in args.methods:
        quant, kv = METHODS[method]
        d = make_model_dir(args.dry_run, method == "awq")
        kw = dict(model=str(d), load_format="dummy", dtype="bfloat16" if cuda else "float32",
                  max_model_len=args.context, max_num_seqs=max(args.batches), max_num_batched_tokens=8192,
                  quantization=quant, kv_cache_dtype=kv, seed=0)
        kw.update(gpu_memory_utilization=args.gpu_memory_utilization) if cuda else kw.update(kv_cache_memory=0.05)
        print(f"== {method} ==", flush=True)
        t0 = time.perf_counter()
        try:
            llm = LLM(**kw)
        except Exception as e:  # report and go on: one method must not sink the run
            print(f"  {method}: failed to start: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
            out[method] = {"error": f"{type(e).__name__}: {e}"}
            continue
        eng = llm.engine
        bs = eng.config.block_size
        info = {"load_s": time.perf_counter() - t0, "num_kv_blocks": eng.num_kv_blocks,
                "kv_tokens": eng.num_kv_blocks * bs, "kv_dtype": str(eng.kv_dtype).replace("torch.", ""),
                "weights_GiB": sum(p.numel() * p.element_size() for p in eng.model.parameters()) / 2 ** 30,
                "max_concurrency_at_context": eng.num_kv_blocks // -(-args.context // bs), "context": args.context}
        print(f"  weights {info['weights_GiB']:.2f} GiB | KV {info['num_kv_blocks']} blocks = {info['kv_tokens']} "
              f"tokens ({info['kv_dtype']}) | {info['max_concurrency_at_context']} concurrent {args.context}-token "
              f"contexts | loaded in {info['load_s']:.0f}s", flush=True)
        warm = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, detokenize=False)
        llm.generate([[5] * 16] * 4, warm, use_tqdm=False)
        # quality vs bf16 (same dummy weights: the same seeded draws on the same device)
        if method != "awq":
            logits = torch.cat([prefill_logits(eng, p).float().cpu() for p in qual_prompts])
            if method == "bf16":
                ref_logits = logits
                cont = llm.generate(qual_prompts, SamplingParams(temperature=0, max_tokens=16 if args.dry_run else 64,
                                                                 ignore_eos=True, detokenize=False), use_tqdm=False)
                ref_cont = [list(o.outputs[0].token_ids) for o in cont]
            elif ref_logits is not None:
                rel = ((logits - ref_logits).norm() / ref_logits.norm()).item()
                top1 = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
                tf = [teacher_forced_agreement(eng, p, r) for p, r in zip(qual_prompts, ref_cont)]
                info.update(logit_rel_err=rel, logit_max_abs_err=(logits - ref_logits).abs().max().item(),
                            prefill_top1_agreement=top1,
                            teacher_forced_agreement=sum(a for a, _ in tf) / max(1, sum(t for _, t in tf)))
                print(f"  quality vs bf16: logit rel err {rel:.3e} (max abs {info['logit_max_abs_err']:.3f}) | "
                      f"prefill top-1 {top1:.1%} | teacher-forced greedy {info['teacher_forced_agreement']:.1%}",
                      flush=True)
        runs = []
        for b in args.batches:
            prompts = torch.randint(2, vocab, (b, args.prompt_len), generator=g).tolist()
            params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True, detokenize=False)
            if cuda:
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            res = llm.generate(prompts, params, use_tqdm=False)
            if cuda:
                torch.cuda.synchronize()
            dt_s = time.perf_counter() - t1
            got = sum(len(r.outputs[0].token_ids) for r in res)
            runs.append({"batch": b, "seconds": dt_s, "output_tokens": got, "tok_s": got / dt_s})
            print(f"  b={b:<4} {got / dt_s:10,.0f} tok/s ({dt_s:.2f}s)", flush=True)
        info["runs"] = runs
        out[method] = info
        del llm, eng
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return out


def summary(engines: dict, batches: list[int]) -> None:
    base = engines.get("bf16", {})
    base_tps = {r["batch"]: r["tok_s"] for r in base.get("runs", [])}
    print("\n== summary (tok/s; x bf16) ==")
    head = f"{'method':<8} {'weights':>8} {'KV blocks':>10} {'ctx fit':>8} " + " ".join(f"{'b=' + str(b):>16}" for b in batches)
    print(head + "   logit err  greedy")
    for m, info in engines.items():
        if "error" in info:
            print(f"{m:<8} failed: {info['error'][:100]}")
            continue
        cells = []
        for r in info["runs"]:
            x = r["tok_s"] / base_tps[r["batch"]] if r["batch"] in base_tps else float("nan")
            cells.append(f"{r['tok_s']:>9,.0f} {x:5.2f}x")
        q = (f"   {info['logit_rel_err']:.2e}  {info['teacher_forced_agreement']:.1%}"
             if "logit_rel_err" in info else "")
        print(f"{m:<8} {info['weights_GiB']:7.2f}G {info['num_kv_blocks']:>10} {info['max_concurrency_at_context']:>8} "
              + " ".join(f"{c:>16}" for c in cells) + q)


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("needs a CUDA GPU (or --dry-run on the CPU)", file=sys.stderr)
        return 2
    if not cuda:
        os.environ["PAGEDSERVE_FP8_EMULATE"] = "1"  # the CPU runs the fp8 arithmetic, slowly
    dev = torch.device("cuda" if cuda else "cpu")
    t0 = time.time()
    result = {"gpu": torch.cuda.get_device_name() if cuda else "cpu (dry run)", "torch": torch.__version__,
              "shape": "tiny" if args.dry_run else SHAPE, "args": {k: v for k, v in vars(args).items()}}
    result["engines"] = engine_part(args, dev)
    summary(result["engines"], args.batches)
    result["wall_s"] = time.time() - t0
    out = Path(args.out or (Path(os.environ["OUT"]) / "gpu_quant.json" if os.environ.get("OUT")
                            else ROOT / "benchmarks/results/gpu_quant.json"))
    if args.dry_run and not args.out:
        out = Path(tempfile.gettempdir()) / "gpu_quant_dry_run.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} ({result['wall_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
