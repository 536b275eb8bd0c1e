"""Greedy agreement between float16 and bfloat16 on the Qwen-7B-Chat shape (QWenLMHeadModel, dummy weights).

    python benchmarks/qwen_dtype_agreement.py               # GPU: 7B shape, both dtypes, one process each
    python benchmarks/qwen_dtype_agreement.py --dry-run     # CPU: the tiny QWen shape

A V100 runs this family in float16 (`--dtype auto` picks it below compute capability 8.0); this says how far
float16's greedy tokens stay with bfloat16's on the same weights (the dummy loader draws the same normal
values for both dtypes, rounded to each). Prompts are random token ids: short ones, and ones past
seq_length (8192) so that dynamic NTK and logn take part. Writes qwen_dtype_agreement.json to --out
($OUT, else ./out): per prompt length, the share of requests whose tokens are identical, the mean length
of the common prefix, and first-token agreement.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def prompts(lengths: list[int], n: int, vocab: int) -> dict[int, list[list[int]]]:
    import random

    rng = random.Random(0)
    return {length: [[rng.randrange(2, vocab) for _ in range(length)] for _ in range(n)] for length in lengths}


def worker(mdir: str, dtype: str, args) -> dict:
    from pagedserve import LLM, SamplingParams
    from peer_vllm import QWEN_TOKENIZER_SIZE

    llm = LLM(model=mdir, load_format="dummy", dtype=dtype, max_model_len=max(args.lengths) + args.output_len + 16,
              max_num_seqs=args.n, **({} if args.dry_run else {"gpu_memory_utilization": 0.85}))
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True, detokenize=False)
    out = {}
    for length, ps in prompts(args.lengths, args.n, QWEN_TOKENIZER_SIZE).items():
        res = llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
        out[str(length)] = [list(r.outputs[0].token_ids) for r in res]
    return out


def compare(a: dict, b: dict) -> dict:
    rows = {}
    for length, xs in a.items():
        ys = b[length]
        prefix = []
        for x, y in zip(xs, ys):
            k = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
            prefix.append(k)
        rows[length] = {"requests": len(xs), "identical": sum(x == y for x, y in zip(xs, ys)) / len(xs),
                        "first_token": sum(x[:1] == y[:1] for x, y in zip(xs, ys)) / len(xs),
                        "mean_common_prefix": sum(prefix) / len(prefix), "output_len": len(xs[0])}
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="128,4096,12288", help="prompt lengths (12288 > seq_length 8192)")
    ap.add_argument("--n", type=int, default=16, help="requests per length")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--dry-run", action="store_true", help="CPU: the tiny QWen shape, short prompts")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dry_run:
        args.lengths, args.n, args.output_len = "8,40", 2, 4
    args.lengths = [int(x) for x in str(args.lengths).split(",") if x]
    if args.worker:
        print("RESULT " + json.dumps(worker(args.model_dir, args.worker, args)), flush=True)
        return 0
    from peer_vllm import model_dir, run_bounded

    mdir = model_dir("qwen-tiny" if args.dry_run else "qwen7b")
    runs = {}
    for dtype in ("bfloat16", "float16"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", dtype, "--model-dir", str(mdir)]
        code, out = run_bounded(cmd, 1800, stdout=subprocess.PIPE, text=True)
        line = next((ln for ln in reversed((out or "").splitlines()) if ln.startswith("RESULT ")), None)
        if code != 0 or line is None:
            print(f"{dtype}: exit {code}", file=sys.stderr)
            return 1
        runs[dtype] = json.loads(line[len("RESULT "):])
    rows = compare(runs["bfloat16"], runs["float16"])
    out_dir = Path(args.out or os.environ.get("OUT") or ROOT / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"shape": "qwen-tiny" if args.dry_run else "qwen7b", "rows": rows, "tokens": runs}
    try:
        import torch

        report["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001 - the device name is informative only
        pass
    (out_dir / "qwen_dtype_agreement.json").write_text(json.dumps(report, indent=1))
    print(f"{'prompt':>7} {'identical':>9} {'first token':>11} {'common prefix':>13}")
    for length, r in rows.items():
        print(f"{length:>7} {r['identical']:>9.0%} {r['first_token']:>11.0%} "
              f"{r['mean_common_prefix']:>7.1f}/{r['output_len']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
