"""`pagedserve router --backend URL [--backend URL ...] --policy P`: a standalone router in front
of OpenAI-compatible servers (pagedserve, vLLM, SGLang)."""
from __future__ import annotations

import argparse
import os

from pagedserve.cluster.policies import DEFAULT_POLICY, POLICIES


def add_parser(sub) -> None:
    p = sub.add_parser("router", help="load-aware router in front of OpenAI-compatible servers",
                       description="A load-aware router in front of OpenAI-compatible servers (pagedserve, vLLM, "
                       "SGLang): health checks, failover, streaming pass-through, /metrics.")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", action="append", default=[], metavar="URL",
                   help="a backend, e.g. http://10.0.0.5:8000 (repeat, or comma-separate)")
    p.add_argument("--backends-file", default=None, metavar="PATH",
                   help="file with one backend URL a line; re-read when it changes (add/remove at runtime)")
    p.add_argument("--policy", default=DEFAULT_POLICY, choices=sorted(POLICIES),
                   help=f"routing policy (default: {DEFAULT_POLICY})")
    p.add_argument("--max-retries", type=int, default=2,
                   help="other backends to try for a request that failed before its first byte")
    p.add_argument("--health-check-interval", type=float, default=1.0, metavar="S")
    p.add_argument("--health-path", default="/health")
    p.add_argument("--metrics-interval", type=float, default=0.25, metavar="S",
                   help="backend /metrics scrape period (engine_load, gpu_util)")
    p.add_argument("--request-timeout", type=float, default=600.0, metavar="S",
                   help="longest wait for the next bytes from a backend")
    p.add_argument("--prefix-chars", type=int, default=256,
                   help="prompt characters that prefix_affinity hashes when there is no session id / user")
    p.add_argument("--load-factor", type=float, default=1.25,
                   help="prefix_affinity: a backend takes at most this times its fair share of in-flight requests")
    p.add_argument("--admin-api-key", default=None,
                   help="turn on /admin/backends (list, add, remove backends) behind 'Authorization: Bearer KEY' "
                        "(default: $PAGEDSERVE_ADMIN_API_KEY; without a key /admin/* answers 403)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    from pagedserve.answer_cache.args import add_answer_cache_args

    add_answer_cache_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal

    from pagedserve.answer_cache.args import config_from_args
    from pagedserve.answer_cache.middleware import wrap
    from pagedserve.cluster.router import Router, RouterConfig
    from pagedserve.cluster.uvicorn_server import Server, new_event_loop, uvicorn_config
    from pagedserve.errors import ConfigError

    logging.getLogger("pagedserve").setLevel(args.log_level.upper())
    cache_cfg = config_from_args(args)  # a bad or unreachable Redis fails here, as one line
    urls = [u for b in args.backend for u in b.split(",") if u.strip()]
    if not urls and not args.backends_file:
        logging.getLogger("pagedserve.router").warning(
            "no backend given: add some with POST /admin/backends (needs --admin-api-key) or use --backend / "
            "--backends-file")
    cfg = RouterConfig(policy=args.policy, max_retries=args.max_retries, health_interval=args.health_check_interval,
                       health_path=args.health_path, metrics_interval=args.metrics_interval,
                       request_timeout=args.request_timeout, prefix_chars=args.prefix_chars,
                       load_factor=args.load_factor,
                       admin_api_key=args.admin_api_key or os.environ.get("PAGEDSERVE_ADMIN_API_KEY") or None,
                       backends_file=args.backends_file)
    try:
        router = Router(urls, cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    server = Server(uvicorn_config(wrap(router, cache_cfg, router.registry), args.host, args.port))
    loop = new_event_loop()
    asyncio.set_event_loop(loop)

    def stop(*_):
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    logging.getLogger("pagedserve.router").info("router on http://%s:%d (policy %s, answer cache %s)", args.host, args.port,
                                                  args.policy, args.answer_cache)
    try:
        loop.run_until_complete(server.serve())
    finally:
        loop.close()
    return 0 if server.started else 1
