"""`pagedserve` command line: a thin dispatcher over per-layer subcommand modules.

Each module named in COMMANDS exposes `add_parser(subparsers)`, which registers
its subcommand and sets `func=run` where `run(args) -> int`. Modules import
their heavy dependencies (torch, fastapi) inside `run`, so `--help` stays fast.
Errors from our own hierarchy print as one line; `--debug` shows tracebacks.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = [
    "pagedserve.entrypoints.generate_command",  # generate, chat
    "pagedserve.server.serve_command",  # serve
    "pagedserve.cluster.router_command",  # router
    "pagedserve.bench.bench_command",  # bench serve | throughput
    "pagedserve.plan.plan_command",  # plan
    "pagedserve.download",  # download
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedserve", description="PagedAttention LLM serving")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):  # that layer is not part of this build
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from pagedserve.errors import PagedServeError

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except PagedServeError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
