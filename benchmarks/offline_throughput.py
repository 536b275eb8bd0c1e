#!/usr/bin/env python
"""Offline throughput: pagedserve vs Hugging Face `generate`, measured in the same run on this CPU.

The scenarios of issue 3, on the default model (SmolLM2-135M-Instruct) in fp32:
  (a) fixed:          128-token prompts, 64 new tokens, batch 1 / 8 / 32
  (b) longtail:       64 requests, prompts 64-192 tokens, long-tailed outputs 16-256 tokens, batch 32
                      (HF static batches run to the longest output in each batch; only the tokens a
                      request asked for count, for both engines)
  (c) shared-prefix:  32 requests sharing a 512-token system prompt + a 16-48-token question, batch 32;
                      pagedserve with prefix caching on and off, plus HF

Prints a table (output tok/s, ratio vs HF, KV memory efficiency paged vs static pre-allocation, prefix
cache hit rate) and writes JSON (--out). `--quick` shrinks everything to a smoke test of seconds.
Every flag of `pagedserve bench throughput` works here too (see --help); this script only changes
the defaults. Timings on a shared machine are noisy: use --repeat N to keep the best of N runs.

    .venv/bin/python benchmarks/offline_throughput.py [--repeat 2] [--out results.json]
"""
from __future__ import annotations

import argparse
import os
import sys

# OpenMP threads that spin while waiting burn the CPU they wait for when other processes share the
# cores (2 threads on a busy 2-core machine ran 4x slower than 1); sleeping waiters keep both engines
# measurable there. Must be set before torch loads its OpenMP runtime; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pagedserve.bench import offline  # noqa: E402

DEFAULT_OUT = "benchmarks/results/offline_throughput.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    offline.add_arguments(parser)
    parser.add_argument("--no-hf", dest="compare_hf", action="store_false", help="skip Hugging Face")
    parser.set_defaults(scenarios=list(offline.SCENARIOS), batch_sizes=[1, 8, 32], compare_hf=True,
                        out=DEFAULT_OUT)
    return parser


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING)
    return offline.run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
