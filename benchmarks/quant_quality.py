#!/usr/bin/env python
"""Weight quantization: quality, speed and memory of none / int8 / int4 (AWQ format) on one model.

For each method, on the same device:
  * perplexity on a fixed English text shipped in the repo (benchmarks/data/quant_eval_text.txt,
    ~2300 words written for this benchmark), in non-overlapping windows;
  * greedy agreement with the unquantized model over N prompts x M tokens: teacher-forced (the model
    reads the reference's tokens and predicts each next one) and free-running (its own greedy output,
    position by position, where one near-tie flip changes everything after it);
  * offline throughput (output tokens/s of a batch of greedy requests) and the model's weight memory.

int4 is this repo's round-to-nearest AWQ-format quantization (awq_format.write_awq_checkpoint; zero
points per group, no activation-aware scale search), loaded through `quantization="awq"`; a real AWQ
checkpoint searches scales and does better. The default model is tiny (SmolLM2-135M, hidden 576, so
group 64: 576 is not a multiple of 128): small models lose more to 4 bits than 7B ones do.

    .venv/bin/python benchmarks/quant_quality.py [--device cpu|cuda] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see offline_throughput.py

import torch  # noqa: E402

from pagedserve import LLM, SamplingParams  # noqa: E402
from pagedserve.bench.quality import free_running_agreement, perplexity, teacher_forced_agreement  # noqa: E402
from pagedserve.quantization.methods import weight_bytes  # noqa: E402

HERE = Path(__file__).resolve().parent
TEXT = HERE / "data" / "quant_eval_text.txt"
PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "List three prime numbers:",
    "def fibonacci(n):\n    ",
    "In 1969, the first humans to walk on the Moon were",
    "Translate to French: 'Good morning, my friend.' ->",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "The three laws of thermodynamics state that",
    "Q: What is the boiling point of water at sea level?\nA:",
    "A good error message should",
    "import numpy as np\n\ndef softmax(x):",
    "The main causes of the French Revolution were",
    "Photosynthesis is the process by which",
    "Here is a recipe for pancakes. Ingredients:",
    "The difference between a list and a tuple in Python is",
    "Dear hiring manager, I am writing to apply for",
]


def awq_dir_for(model: str | None, group: int) -> Path:
    """The RTN AWQ-format copy of the model, written once into the pagedserve cache."""
    from pagedserve.quantization.awq_format import write_awq_checkpoint
    from pagedserve.model.loader import resolve_model_dir

    src = resolve_model_dir(model)
    cache = Path(os.environ.get("PAGEDSERVE_CACHE", Path.home() / ".cache" / "pagedserve"))
    dst = cache / "awq-rtn" / f"{src.name}-g{group}"
    if not (dst / "config.json").exists():
        tmp = Path(tempfile.mkdtemp(dir=cache))
        write_awq_checkpoint(src, tmp, group)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(dst)
    return dst


def measure(name: str, llm: LLM, text_ids: list[int], prompts: list[list[int]], ref: list[list[int]] | None,
            args) -> tuple[dict, list[list[int]]]:
    eng = llm.engine
    t = time.perf_counter()
    ppl, n_tok = perplexity(eng, text_ids, args.window)
    ppl_s = time.perf_counter() - t
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    dt = time.perf_counter() - t
    toks = [list(o.outputs[0].token_ids) for o in outs]
    row = {"method": name, "perplexity": ppl, "ppl_tokens": n_tok, "ppl_seconds": ppl_s,
           "weight_gib": weight_bytes(eng.model) / 2 ** 30,
           "throughput_tok_s": sum(len(x) for x in toks) / dt, "generate_seconds": dt}
    if ref is not None:
        tf = [teacher_forced_agreement(eng, p, r) for p, r in zip(prompts, ref)]
        fr = [free_running_agreement(r, o) for r, o in zip(ref, toks)]
        row["teacher_forced_agreement"] = sum(a for a, _ in tf) / sum(b for _, b in tf)
        row["free_running_agreement"] = sum(a for a, _ in fr) / sum(b for _, b in fr)
        row["first_token_agreement"] = sum(int(r[:1] == o[:1]) for r, o in zip(ref, toks)) / len(ref)
    return row, toks


def emulate_int8_w8a8(model: torch.nn.Module) -> int:
    """Make every Int8Linear compute the GPU's W8A8 arithmetic (int8_w8a8_reference) on this device."""
    from pagedserve.quantization.int8_w8a8 import int8_w8a8_reference
    from pagedserve.quantization.methods import Int8Linear

    mods = [m for m in model.modules() if isinstance(m, Int8Linear)]
    for m in mods:
        m.forward = lambda x, m=m: int8_w8a8_reference(x, m.weight, m.scale, m.bias)
    return len(mods)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF dir or Hub id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--methods", nargs="+", default=["none", "int8", "int4"],
                   choices=["none", "int8", "int8_w8a8", "int4", "fp8", "fp8_kv"],
                   help="fp8: e4m3 W8A8 (emulated on the CPU: same arithmetic, not fast); fp8_kv: fp8 weights and "
                        "an fp8 KV cache; int8_w8a8: the GPU's int8 arithmetic (activations quantized per token "
                        "too) where the device runs int8 weight-only (the CPU)")
    p.add_argument("--group-size", type=int, default=64, help="int4 group size (default 64: 576 = 9 x 64)")
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"greedy prompts (max {len(PROMPTS)})")
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    p.add_argument("--window", type=int, default=512, help="perplexity window in tokens")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/quant_quality_<device>.json)")
    args = p.parse_args(argv)

    kw = dict(device=args.device, dtype=args.dtype, max_model_len=2048, kv_cache_memory=0.5)
    rows, ref, device = [], None, None
    for method in args.methods:
        if method == "int4":
            llm = LLM(str(awq_dir_for(args.model, args.group_size)), quantization="awq", **kw)
        elif method in ("fp8", "fp8_kv"):
            os.environ.setdefault("PAGEDSERVE_FP8_EMULATE", "1")  # used only where the device has no fp8 (CPU)
            llm = LLM(args.model, quantization="fp8", kv_cache_dtype="fp8" if method == "fp8_kv" else "auto", **kw)
        elif method == "int8_w8a8":
            llm = LLM(args.model, quantization="int8", **kw)
            emulate_int8_w8a8(llm.engine.model)
        else:
            llm = LLM(args.model, quantization=None if method == "none" else method, **kw)
        device = str(llm.engine.device)
        tok = llm.tokenizer
        text_ids = tok.encode(TEXT.read_text())
        prompts = [tok.encode(x) for x in PROMPTS[:args.prompts]]
        row, toks = measure(method, llm, text_ids, prompts, ref, args)
        if method == "none":
            ref = toks
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        del llm
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    hdr = f"{'method':<7} {'ppl':>8} {'agree(tf)':>10} {'agree(free)':>12} {'1st tok':>8} {'tok/s':>8} {'weights GiB':>12}"
    print(hdr)
    for r in rows:
        def pct(k):
            return f"{100 * r[k]:.1f}%" if k in r else "-"
        print(f"{r['method']:<7} {r['perplexity']:>8.3f} {pct('teacher_forced_agreement'):>10} "
              f"{pct('free_running_agreement'):>12} {pct('first_token_agreement'):>8} "
              f"{r['throughput_tok_s']:>8.1f} {r['weight_gib']:>12.3f}")
    result = {
        "model": args.model or "SmolLM2-135M-Instruct", "device": device, "dtype": args.dtype,
        "text": str(TEXT.relative_to(HERE.parent)), "ppl_window": args.window,
        "greedy": {"prompts": args.prompts, "tokens": args.tokens}, "int4_group_size": args.group_size,
        "host": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if device and device.startswith("cuda") else None,
        "rows": rows,
        "notes": "weight_gib counts every parameter (embeddings, norms, the dense LM head) at its stored size; "
                 "on CPU the tied LM head is a oneDNN-packed copy of the embedding, counted too",
    }
    out = Path(args.out or HERE / "results" / f"quant_quality_{'cuda' if device.startswith('cuda') else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
