"""`pagedserve bench serve` (online load test) and `pagedserve bench throughput` (offline engine)."""
from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks: serve (load-test a server) | throughput (offline engine)")
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCH")

    from pagedserve.bench import serve

    p = bsub.add_parser("serve", help="load-test an OpenAI-compatible server over a sweep of loads",
                        description="Load-test an OpenAI-compatible server: sweep concurrency or request rate, "
                                    "report TTFT/TPOT/ITL/E2E percentiles, throughput, goodput and the knee.")
    serve.add_arguments(p)
    p.set_defaults(func=serve.run)

    p = bsub.add_parser("report", help="re-analyse a saved `bench serve` JSON (another SLO, plots, CSV)")
    serve.add_report_arguments(p)
    p.set_defaults(func=serve.report_run)

    p = bsub.add_parser("throughput", help="offline engine throughput (optionally against Hugging Face generate)")
    try:  # owned by the offline benchmark; its heavy imports happen inside its run()
        from pagedserve.bench import offline
    except ModuleNotFoundError as e:
        if e.name != "pagedserve.bench.offline":
            raise
        p.set_defaults(func=_offline_missing)
    else:
        offline.add_arguments(p)
        p.set_defaults(func=offline.run)
    bench.set_defaults(func=lambda args: (bench.print_help(), 2)[1])


def _offline_missing(args: argparse.Namespace) -> int:
    from pagedserve.errors import ConfigError

    raise ConfigError("`bench throughput` is not part of this build", hint="pagedserve/bench/offline.py is missing")
