"""The `--answer-cache*` flags shared by `serve` and `router`, and the config they give."""
from __future__ import annotations

import argparse

from pagedserve.answer_cache.config import BACKENDS, AnswerCacheConfig
from pagedserve.answer_cache.redis_backend import check_redis


def parse_size(text: str) -> int:
    """'268435456', '256M', '1.5G' -> bytes (K, M, G are powers of 1024)."""
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
    try:
        value = float(s[:-1] if mult > 1 else s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 268435456, 256M, 1G)") from None
    return int(value * mult)


def add_answer_cache_args(p) -> None:
    g = p.add_argument_group("answer cache", "exact-match replay of deterministic requests (temperature 0 or a "
                             "seed) on /v1/completions and /v1/chat/completions")
    g.add_argument("--answer-cache", default=AnswerCacheConfig.backend, choices=BACKENDS,
                   help="off (default), memory (this process) or redis (shared, --answer-cache-redis-url)")
    d = AnswerCacheConfig()
    g.add_argument("--answer-cache-ttl", type=float, default=d.ttl, metavar="S", help="seconds an answer is kept")
    g.add_argument("--answer-cache-max-bytes", type=parse_size, default=d.max_bytes, metavar="SIZE",
                   help=f"memory backend bound, LRU by bytes (e.g. 256M; default {d.max_bytes >> 20}M)")
    g.add_argument("--answer-cache-max-entry-bytes", type=parse_size, default=d.max_entry_bytes, metavar="SIZE",
                   help=f"larger answers are not stored (default {d.max_entry_bytes >> 20}M)")
    g.add_argument("--answer-cache-redis-url", default=None, metavar="URL", help="e.g. redis://127.0.0.1:6379/0")


def config_from_args(args, salt: str = "") -> AnswerCacheConfig:
    """The validated config; a redis URL is checked (reachable) here, before serving starts."""
    cfg = AnswerCacheConfig(backend=args.answer_cache, ttl=args.answer_cache_ttl, max_bytes=args.answer_cache_max_bytes,
                            max_entry_bytes=args.answer_cache_max_entry_bytes, redis_url=args.answer_cache_redis_url,
                            salt=salt)
    cfg.validate()
    if cfg.backend == "redis":
        check_redis(cfg.redis_url)
    return cfg
