"""Speculative decoding (n-gram prompt lookup): tokens/s with and without drafts, and the acceptance length.

    python benchmarks/speculative.py                      # CPU, default model, the short version
    python benchmarks/speculative.py --full               # more prompts and tokens per row
    python benchmarks/speculative.py --device cuda --vllm # GPU: pagedserve and vLLM's ngram, same run

Workloads (greedy; the default model with its real weights, chat template applied):
- grounded: answers that quote the prompt (copy a passage with one edit, reproduce a code block with one
  change, answer by quoting a given document), at batch 1 and 8;
- chat: free-form questions where lookups mostly miss, at batch 1, and at batch 32 with
  `disable_by_batch_size` 16 (speculation off at that load).
Each (engine, speculation) runs in its own process. Dummy weights are not a valid workload here: their
greedy outputs loop and lookups hit unrealistically often. vLLM must be importable for --vllm (on the GPU
machine: `../shared/peers/vllm/README.md`). Prints a table; writes speculative.json to --out.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

PASSAGE = ("The lighthouse stood on a rock at the mouth of the bay. Every evening the keeper climbed the ninety "
           "steps, trimmed the wick and wound the clockwork that turned the lens. Ships passing in the night "
           "saw the beam sweep across the water every twelve seconds, and knew where the reef lay.")
CODE = '''def moving_average(values, window):
    """Return the moving averages of values over the given window."""
    if window <= 0:
        raise ValueError("window must be positive")
    out = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out'''
DOC = ("Refund policy. Customers may return any unused item within 30 days of delivery for a full refund. "
       "Items must be in their original packaging. Refunds are issued to the original payment method within "
       "5 business days after the returned item is received. Shipping costs are not refunded unless the item "
       "arrived damaged or the wrong item was sent.")
GROUNDED = [
    f"Copy the following passage exactly, but replace 'twelve' with 'ten':\n\n{PASSAGE}",
    f"Reproduce this Python function exactly, with one change: rename `total` to `running_sum`.\n\n{CODE}",
    f"Here is a document:\n\n{DOC}\n\nQuoting the document word for word, what does it say about refunds and "
    f"shipping costs?",
    f"Rewrite this passage with every sentence unchanged except the last, which should say 'the rocks' "
    f"instead of 'the reef':\n\n{PASSAGE}",
    f"Copy this code block exactly and add a type hint `-> list[float]` to the function:\n\n{CODE}",
    f"Document:\n\n{DOC}\n\nQuote the sentence about the original packaging and the sentence about the "
    f"payment method.",
    f"Repeat the passage below word for word:\n\n{PASSAGE}",
    f"Copy the function below, changing only the error message to 'window must be > 0':\n\n{CODE}",
]
CHAT = ["What are three good habits for staying focused while studying?", "Explain why the sky is blue.",
        "Give me a short recipe idea for dinner with rice and vegetables.", "What is a prime number?",
        "Write a two-sentence story about a robot learning to paint.", "How do vaccines work, briefly?",
        "Suggest a name for a coffee shop by the sea.", "What should I pack for a weekend hiking trip?"]
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


def rows(full: bool, only: str | None = None, max_tokens: int | None = None) -> list[tuple[str, list[str], int, dict]]:
    """(name, prompts, max_tokens, extra speculative keys) per table row; `only`: rows whose name contains it."""
    g8 = GROUNDED * (2 if full else 1)
    chat32 = [CHAT[i % len(CHAT)] + " " * (i // len(CHAT)) for i in range(32)]  # distinct prompts
    t = 128 if full else 64
    out = [("grounded b=1", GROUNDED[:4 if full else 2], t, {}),
           ("grounded b=8", g8[:8], t, {}),
           ("chat b=1", CHAT[:4 if full else 2], t, {}),
           ("chat b=32 disable_by_batch_size=16", chat32, 32 if not full else 64, {"disable_by_batch_size": 16})]
    return [(n, p, max_tokens or m, e) for n, p, m, e in out if only is None or only in n]


def worker(engine: str, spec: bool, args) -> dict:
    from pagedserve.model.default_model import default_model_dir
    from transformers import AutoTokenizer

    mdir = str(default_model_dir())
    tok = AutoTokenizer.from_pretrained(mdir)
    out = []
    llm = None
    for name, prompts, max_tokens, extra in rows(args.full, args.rows, args.max_tokens):
        cfg = {**NGRAM, **extra} if spec else None
        key = json.dumps(cfg, sort_keys=True)
        if llm is None or key != getattr(llm, "_bench_key", None):
            llm = _engine(engine, mdir, args.device, cfg)
            llm._bench_key = key
        ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                  tokenize=False), add_special_tokens=False) for p in prompts]
        batch = 1 if "b=1" in name else len(prompts)
        tokens, secs = 0, 0.0
        _gen(engine, llm, [ids[0]], 8)  # warm-up
        before = _counters(engine, llm)
        for i in range(0, len(ids), batch):
            t0 = time.perf_counter()
            res = _gen(engine, llm, ids[i:i + batch], max_tokens)
            secs += time.perf_counter() - t0
            tokens += sum(len(r.outputs[0].token_ids) for r in res)
        after = _counters(engine, llm)
        drafts, accepted = after[0] - before[0], after[1] - before[1]
        out.append({"row": name, "tokens": tokens, "seconds": secs, "tok_s": tokens / secs,
                    "drafts": drafts, "mean_acceptance_length": 1 + accepted / drafts if drafts else None})
        print(f"  {engine} spec={spec} {name}: {tokens / secs:.1f} tok/s", file=sys.stderr, flush=True)
    return {"engine": engine, "spec": spec, "rows": out}


def _engine(engine: str, mdir: str, device: str, cfg: dict | None):
    if engine == "pagedserve":
        from pagedserve import LLM

        return LLM(model=mdir, device=device, max_model_len=2048, speculative_config=cfg)
    from vllm import LLM

    return LLM(model=mdir, max_model_len=2048, seed=0, speculative_config=cfg, gpu_memory_utilization=0.5,
               disable_log_stats=False)


def _gen(engine: str, llm, ids: list[list[int]], max_tokens: int):
    if engine == "pagedserve":
        from pagedserve import SamplingParams

        return llm.generate([{"prompt_token_ids": p} for p in ids], SamplingParams(temperature=0, max_tokens=max_tokens),
                            use_tqdm=False)
    from vllm import SamplingParams

    return llm.generate([{"prompt_token_ids": p} for p in ids], SamplingParams(temperature=0, max_tokens=max_tokens),
                        use_tqdm=False)


def _counters(engine: str, llm) -> tuple[float, float]:
    """(verify rows, kept drafts) so far."""
    if engine == "pagedserve":
        spec = llm.engine.spec
        return (spec.stats.num_drafts, spec.stats.num_accepted_tokens) if spec is not None else (0, 0)
    drafts = accepted = 0.0
    try:
        for m in llm.get_metrics():
            if m.name == "vllm:spec_decode_num_drafts":
                drafts += m.value
            elif m.name == "vllm:spec_decode_num_accepted_tokens":
                accepted += m.value
    except Exception:  # no metrics in this vLLM build: the acceptance column stays empty
        pass
    return drafts, accepted


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--vllm", action="store_true", help="also run vLLM 0.26's ngram (GPU)")
    ap.add_argument("--full", action="store_true", help="more prompts and tokens per row")
    ap.add_argument("--rows", default=None, help="only the rows whose name contains this (e.g. 'b=1')")
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens per request (default 64; --full 128)")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--worker", choices=["pagedserve", "vllm"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.spec, args)), flush=True)
        return 0
    from peer_vllm import run_bounded

    argv = ["--device", args.device] + (["--full"] if args.full else []) + (
        ["--rows", args.rows] if args.rows else []) + (["--max-tokens", str(args.max_tokens)] if args.max_tokens else [])
    results = []
    for engine in ["pagedserve"] + (["vllm"] if args.vllm else []):
        for spec in (False, True):
            cmd = [sys.executable, __file__, *argv, "--worker", engine] + (["--spec"] if spec else [])
            code, text = run_bounded(cmd, 3600, stdout=subprocess.PIPE, text=True)
            line = next((ln for ln in reversed(text.splitlines()) if ln.startswith("RESULT ")), None)
            if code or line is None:
                print(f"{engine} spec={spec}: exit {code}", file=sys.stderr)
                continue
            results.append(json.loads(line[len("RESULT "):]))
    print(f"\n{'engine':<11} {'row':<36} {'plain tok/s':>11} {'ngram tok/s':>11} {'speed-up':>8} {'accept len':>10}")
    for engine in ("pagedserve", "vllm"):
        plain = next((r for r in results if r["engine"] == engine and not r["spec"]), None)
        spec = next((r for r in results if r["engine"] == engine and r["spec"]), None)
        if plain is None or spec is None:
            continue
        for a, b in zip(plain["rows"], spec["rows"]):
            acc = b["mean_acceptance_length"]
            print(f"{engine:<11} {a['row']:<36} {a['tok_s']:>11.1f} {b['tok_s']:>11.1f} {b['tok_s'] / a['tok_s']:>7.2f}x "
                  f"{acc if acc is None else round(acc, 2)!s:>10}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "speculative.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
