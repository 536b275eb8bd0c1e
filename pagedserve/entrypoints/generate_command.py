"""`pagedserve generate "prompt"` and `pagedserve chat "message"`: one-shot completions on the offline engine."""
from __future__ import annotations

import argparse
import sys

from pagedserve.entrypoints.engine_args import add_engine_args, engine_kwargs


def add_parser(sub) -> None:
    for name, helptext in (("generate", "complete a prompt"), ("chat", "answer one chat message")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("prompt", help="the prompt text ('-' reads standard input)")
        add_engine_args(p)
        p.add_argument("--max-tokens", type=int, default=128)
        p.add_argument("--temperature", type=float, default=0.0)
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--top-k", type=int, default=-1)
        p.add_argument("-n", type=int, default=1)
        p.add_argument("--stop", action="append", default=None)
        p.set_defaults(func=run, mode=name)


def run(args: argparse.Namespace) -> int:
    from pagedserve.llm import LLM
    from pagedserve.sampling_params import SamplingParams

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, n=args.n, stop=args.stop, seed=args.seed)
    max_len = args.max_model_len or 2048
    llm = LLM(**engine_kwargs(args, args.model_opt) | {"max_model_len": max_len})
    if args.mode == "chat":
        out = llm.chat([{"role": "user", "content": prompt}], params, use_tqdm=False)[0]
    else:
        out = llm.generate(prompt, params, use_tqdm=False)[0]
    for i, o in enumerate(out.outputs):
        if len(out.outputs) > 1:
            print(f"--- [{i}] ({o.finish_reason})")
        print(o.text)
    return 0
