"""Answer cache: exact-match replay of complete answers to deterministic OpenAI requests.

Shared by the router and the server as one ASGI middleware (`AnswerCacheMiddleware`) in
front of the app, so neither's request path changes. Only POST /v1/completions and
/v1/chat/completions are considered, and only when the answer cannot vary between calls:
temperature 0 (or top_k 1) or a fixed `seed`. OpenAI's default temperature is 1, so a
request without temperature and without seed is never cached.

Key: the path, a hash of the Authorization header (a hit never hands one caller's answer to
a caller whose credentials were not accepted for it), an optional salt (the server mixes in
its API key) and the canonical JSON of the body (sorted keys, nulls dropped, `stream`
normalised to a bool, `user` ignored: it labels the caller, it does not change the answer).
`stream` stays in the key: a stream and a JSON answer are different bytes.

What is stored: an HTTP 200 JSON answer, or an SSE stream that ended with `data: [DONE]`
and carried no error event; a client that disconnects mid-answer stores nothing. A hit
replays the stored bytes exactly (a stream in one write: same events, not the same timing).

Request header `Cache-Control: no-cache` skips the lookup (the fresh answer refreshes the
entry); `no-store` skips lookup and store. Responses carry `X-Answer-Cache: hit|miss|bypass`.

Backends: `InMemoryBackend` (LRU by bytes with a max-bytes bound, per-entry TTL; one per
process) and `RedisBackend` (shared between router instances; the shared bound is Redis's
own `maxmemory` with `maxmemory-policy allkeys-lru`, entries expire with `SET ... PX`). A
Redis that goes away at run time turns lookups into misses (logged once), never errors.
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger("pagedserve.answer_cache")

CACHE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
IGNORED_FIELDS = frozenset({"user"})  # fields that label the request without changing the answer
BACKENDS = ("off", "memory", "redis")
_SSE_END = b"data: [DONE]\n\n"
_SSE_ERROR = b'data: {"error"'
_HEADER = b"x-answer-cache"
MAX_BODY_BYTES = 16 << 20  # larger request bodies are not keyed (the server refuses them anyway)


@dataclass
class AnswerCacheConfig:
    backend: str = "off"  # off | memory | redis
    ttl: float = 3600.0  # seconds an entry lives
    max_bytes: int = 256 << 20  # in-memory bound (LRU by bytes); Redis uses its own maxmemory
    max_entry_bytes: int = 4 << 20  # larger answers are passed through, not stored
    redis_url: str | None = None
    redis_prefix: str = "pagedserve:answer:"
    salt: str = ""  # mixed into every key (the server passes its API key)

    @property
    def enabled(self) -> bool:
        return self.backend != "off"

    def validate(self) -> None:
        from pagedserve.errors import ConfigError

        if self.backend not in BACKENDS:
            raise ConfigError(f"--answer-cache must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.ttl <= 0:
            raise ConfigError(f"--answer-cache-ttl must be > 0 seconds, not {self.ttl}")
        if self.max_bytes <= 0:
            raise ConfigError(f"--answer-cache-max-bytes must be > 0, not {self.max_bytes}")
        if self.backend == "redis" and not self.redis_url:
            raise ConfigError("--answer-cache redis needs --answer-cache-redis-url, e.g. redis://127.0.0.1:6379/0")


# ---------------------------------------------------------------------------- keys
def deterministic(data: dict) -> bool:
    """True when the request's answer cannot vary: greedy decoding or a fixed seed."""
    seed = data.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool):
        return True
    t = data.get("temperature")
    if isinstance(t, (int, float)) and not isinstance(t, bool) and t == 0:
        return True
    k = data.get("top_k")
    return isinstance(k, int) and not isinstance(k, bool) and k == 1


def cache_key(path: str, data: dict, auth: bytes | None = None, salt: str = "") -> str:
    """`<model>:<sha256>` of the path, credentials, salt and canonical request JSON."""
    norm = {k: v for k, v in data.items() if v is not None and k not in IGNORED_FIELDS}
    norm["stream"] = data.get("stream") is True
    canon = json.dumps(norm, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    h = hashlib.sha256()
    for part in (path.encode(), hashlib.sha256(auth or b"").digest(), salt.encode(), canon.encode()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    model = data.get("model")
    return f"{model if isinstance(model, str) else ''}:{h.hexdigest()}"


def cache_directives(headers: list[tuple[bytes, bytes]]) -> tuple[bool, bool]:
    """(no_cache, no_store) from the request's Cache-Control headers."""
    no_cache = no_store = False
    for k, v in headers:
        if k.lower() == b"cache-control":
            for d in v.decode("latin-1").lower().split(","):
                d = d.strip()
                no_cache |= d in ("no-cache", "max-age=0")
                no_store |= d == "no-store"
    return no_cache, no_store


# ---------------------------------------------------------------------------- entries
@dataclass(frozen=True)
class CachedAnswer:
    content_type: bytes
    body: bytes

    @property
    def stream(self) -> bool:
        return self.content_type.startswith(b"text/event-stream")

    def encode(self) -> bytes:
        return self.content_type + b"\n" + self.body

    @classmethod
    def decode(cls, raw: bytes) -> "CachedAnswer":
        ct, _, body = raw.partition(b"\n")
        return cls(ct, body)


def complete_answer(status: int, content_type: bytes, body: bytes) -> bool:
    """Whether a response is a whole, successful answer worth replaying."""
    if status != 200:
        return False
    if content_type.startswith(b"application/json"):
        return True
    if content_type.startswith(b"text/event-stream"):
        return body.endswith(_SSE_END) and _SSE_ERROR not in body
    return False


# ---------------------------------------------------------------------------- backends
class Backend(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl: float) -> None: ...

    async def close(self) -> None: ...


class InMemoryBackend:
    """LRU by bytes (key + value) with a hard bound and per-entry expiry; thread-safe.

    Expired entries are dropped when read or when the LRU end reaches them; the bound
    holds either way because every byte counts until it is dropped."""

    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.monotonic,
                 on_evict: Callable[[str], None] | None = None):
        self.max_bytes = max_bytes
        self.clock = clock
        self.on_evict = on_evict or (lambda reason: None)
        self._data: collections.OrderedDict[str, tuple[bytes, float]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._data)

    def _drop(self, key: str, reason: str) -> None:
        value, _ = self._data.pop(key)
        self.bytes -= len(key) + len(value)
        self.on_evict(reason)

    def get_now(self, key: str) -> bytes | None:
        with self._lock:
            hit = self._data.get(key)
            if hit is None:
                return None
            if hit[1] <= self.clock():
                self._drop(key, "expired")
                return None
            self._data.move_to_end(key)
            return hit[0]

    def set_now(self, key: str, value: bytes, ttl: float) -> bool:
        size = len(key) + len(value)
        if size > self.max_bytes:
            return False
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.bytes -= len(key) + len(old[0])
            now = self.clock()
            while self._data and self.bytes + size > self.max_bytes:
                k, (_, exp) = next(iter(self._data.items()))
                self._drop(k, "expired" if exp <= now else "size")
            self._data[key] = (value, now + ttl)
            self.bytes += size
            return True

    async def get(self, key: str) -> bytes | None:
        return self.get_now(key)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self.set_now(key, value, ttl)

    async def close(self) -> None:
        pass


class RedisBackend:
    """Shared entries in Redis (`SET prefix+key value PX ttl`). Failures never reach requests:
    the first one is logged, lookups are misses and stores are skipped for `retry_after` s."""

    def __init__(self, url: str, prefix: str = "pagedserve:answer:", timeout: float = 0.5,
                 retry_after: float = 5.0):
        import redis.asyncio as aioredis

        self.url, self.prefix, self.retry_after = url, prefix, retry_after
        self.client = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._down_until = 0.0
        self._down = False

    def _failed(self, e: Exception) -> None:
        if not self._down:
            log.warning("answer cache: Redis at %s failed (%s); lookups are misses until it is back", self.url, e)
            self._down = True
        self._down_until = time.monotonic() + self.retry_after

    def _ok(self) -> None:
        if self._down:
            log.info("answer cache: Redis at %s is back", self.url)
            self._down = False

    async def get(self, key: str) -> bytes | None:
        if self._down and time.monotonic() < self._down_until:
            return None
        try:
            value = await self.client.get(self.prefix + key)
        except Exception as e:  # noqa: BLE001 - any Redis or socket failure is a miss
            self._failed(e)
            return None
        self._ok()
        return value

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        if self._down and time.monotonic() < self._down_until:
            return
        try:
            await self.client.set(self.prefix + key, value, px=max(1, int(ttl * 1000)))
        except Exception as e:  # noqa: BLE001
            self._failed(e)
            return
        self._ok()

    async def close(self) -> None:
        try:
            await self.client.aclose()
        except Exception:  # noqa: BLE001 - closing a dead connection
            pass


def check_redis(url: str, timeout: float = 3.0) -> None:
    """Start-up check: a bad URL or an unreachable Redis is a one-line ConfigError."""
    from pagedserve.errors import ConfigError

    try:
        import redis
    except ImportError:
        raise ConfigError("--answer-cache redis needs the redis package: pip install redis") from None
    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    except ValueError as e:
        raise ConfigError(f"--answer-cache-redis-url {url!r}: {e}") from None
    try:
        client.ping()
    except Exception as e:  # noqa: BLE001 - every failure is the same one-line answer
        raise ConfigError(f"--answer-cache-redis-url {url!r}: cannot reach Redis ({e})") from None
    finally:
        client.close()


# ---------------------------------------------------------------------------- the cache
class _SizeCollector:
    def __init__(self, backend: InMemoryBackend):
        self.backend = backend

    def collect(self):
        entries = GaugeMetricFamily("pagedserve:answer_cache_entries", "Answers held by the in-memory answer cache")
        entries.add_metric([], len(self.backend))
        size = GaugeMetricFamily("pagedserve:answer_cache_bytes", "Bytes (keys + answers) held by the in-memory "
                                 "answer cache")
        size.add_metric([], self.backend.bytes)
        yield from (entries, size)


@dataclass
class Lookup:
    status: str  # hit | miss | bypass
    key: str | None = None  # set when the answer may be stored
    answer: CachedAnswer | None = None


class AnswerCache:
    """Lookups, stores and metrics over one backend."""

    def __init__(self, cfg: AnswerCacheConfig, registry: CollectorRegistry | None = None,
                 backend: Backend | None = None, clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.registry = reg = registry if registry is not None else CollectorRegistry()
        self.m_hits = Counter("pagedserve:answer_cache_hits", "Requests answered from the answer cache", registry=reg)
        self.m_misses = Counter("pagedserve:answer_cache_misses", "Cacheable requests not found in the answer cache",
                                registry=reg)
        self.m_bypass = Counter("pagedserve:answer_cache_bypasses", "Requests that skipped the answer cache, by reason "
                                "(nondeterministic, no_cache, no_store, invalid)", ["reason"], registry=reg)
        self.m_stores = Counter("pagedserve:answer_cache_stores", "Answers stored in the answer cache", registry=reg)
        self.m_evictions = Counter("pagedserve:answer_cache_evictions", "In-memory answer cache entries dropped, by "
                                   "reason (size, expired)", ["reason"], registry=reg)
        self._evict = {r: self.m_evictions.labels(r) for r in ("size", "expired")}
        self._bypass = {r: self.m_bypass.labels(r) for r in ("nondeterministic", "no_cache", "no_store", "invalid")}
        if backend is None:
            if cfg.backend == "redis":
                backend = RedisBackend(cfg.redis_url, cfg.redis_prefix)
            else:
                backend = InMemoryBackend(cfg.max_bytes, clock, self._on_evict)
        elif isinstance(backend, InMemoryBackend):
            backend.on_evict = self._on_evict
        self.backend = backend
        if isinstance(backend, InMemoryBackend):
            reg.register(_SizeCollector(backend))
        self.max_entry_bytes = min(cfg.max_entry_bytes, cfg.max_bytes) if cfg.backend != "redis" else cfg.max_entry_bytes

    def _on_evict(self, reason: str) -> None:
        self._evict[reason].inc()

    def count_bypass(self, reason: str) -> None:
        self._bypass[reason].inc()

    async def lookup(self, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> Lookup:
        try:
            data = json.loads(body) if body else None
        except (ValueError, RecursionError):  # deep nesting: the app answers it with a 400
            data = None
        if not isinstance(data, dict):  # the app answers it with a 400
            self._bypass["invalid"].inc()
            return Lookup("bypass")
        if not deterministic(data):
            self._bypass["nondeterministic"].inc()
            return Lookup("bypass")
        no_cache, no_store = cache_directives(headers)
        if no_store:
            self._bypass["no_store"].inc()
            return Lookup("bypass")
        auth = next((v for k, v in headers if k == b"authorization"), None)
        key = cache_key(path, data, auth, self.cfg.salt)
        if no_cache:
            self._bypass["no_cache"].inc()
            return Lookup("bypass", key)
        raw = await self.backend.get(key)
        if raw is None:
            self.m_misses.inc()
            return Lookup("miss", key)
        self.m_hits.inc()
        return Lookup("hit", key, CachedAnswer.decode(raw))

    async def store(self, key: str, answer: CachedAnswer) -> None:
        raw = answer.encode()
        if len(raw) > self.max_entry_bytes:
            return
        await self.backend.set(key, raw, self.cfg.ttl)
        self.m_stores.inc()

    async def close(self) -> None:
        await self.backend.close()


# ---------------------------------------------------------------------------- ASGI
class AnswerCacheMiddleware:
    """Serves hits itself; on a miss runs the app with the body replayed and a send that
    records the answer, storing it once the last byte went out whole."""

    def __init__(self, app, cache: AnswerCache):
        self.app = app
        self.cache = cache

    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind == "lifespan":
            return await self.app(scope, receive, self._lifespan_send(send))
        if kind != "http" or scope["method"] != "POST" or scope["path"] not in CACHE_PATHS:
            return await self.app(scope, receive, send)
        parts, whole = await _read_body(receive, MAX_BODY_BYTES)
        if parts is None:
            return
        if not whole:  # too large to key: the app gets it untouched (and refuses it, as the server does)
            self.cache.count_bypass("invalid")
            return await self.app(scope, _replay_receive(parts, receive, more=True),
                                  self._capture_send(send, Lookup("bypass")))
        body = b"".join(parts)
        look = await self.cache.lookup(scope["path"], scope["headers"], body)
        if look.answer is not None:
            return await _replay(send, look.answer)
        await self.app(scope, _replay_receive([body], receive), self._capture_send(send, look))

    def _lifespan_send(self, send):
        async def wrapped(msg):
            if msg["type"] == "lifespan.shutdown.complete":
                await self.cache.close()
            await send(msg)

        return wrapped

    def _capture_send(self, send, look: Lookup):
        tag = look.status.encode()
        state = {"on": False, "status": 0, "ct": b"", "parts": [], "size": 0}
        limit = self.cache.max_entry_bytes

        async def wrapped(msg):
            t = msg["type"]
            if t == "http.response.start":
                headers = list(msg.get("headers", ()))
                ct = next((v for k, v in headers if k.lower() == b"content-type"), b"")
                state.update(status=msg["status"], ct=ct, on=look.key is not None and msg["status"] == 200)
                msg = {**msg, "headers": headers + [(_HEADER, tag)]}
                await send(msg)
                return
            if t == "http.response.body" and state["on"]:
                chunk = msg.get("body", b"")
                state["size"] += len(chunk)
                if state["size"] > limit:
                    state.update(on=False, parts=[])
                else:
                    state["parts"].append(chunk)
                await send(msg)
                if not msg.get("more_body") and state["on"]:
                    body = b"".join(state["parts"])
                    state.update(on=False, parts=[])
                    if complete_answer(state["status"], state["ct"], body):
                        await self.cache.store(look.key, CachedAnswer(state["ct"], body))
                return
            await send(msg)

        return wrapped


async def _replay(send, answer: CachedAnswer) -> None:
    headers = [(b"content-type", answer.content_type), (b"content-length", str(len(answer.body)).encode()),
               (_HEADER, b"hit")]
    if answer.stream:
        headers += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body})


def _replay_receive(parts: list[bytes], receive, more: bool = False):
    """The body read so far (the app reads it again), then the client's own messages (the rest
    of a body, disconnects)."""
    queue = list(parts) or [b""]

    async def wrapped():
        if queue:
            chunk = queue.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(queue) or more}
        return await receive()

    return wrapped


async def _read_body(receive, limit: int) -> tuple[list[bytes] | None, bool]:
    """(chunks, whole): stops once more than `limit` bytes came; None if the client went away."""
    parts, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None, False
        chunk = msg.get("body", b"")
        parts.append(chunk)
        size += len(chunk)
        if not msg.get("more_body"):
            return parts, True
        if size > limit:
            return parts, False


# ---------------------------------------------------------------------------- CLI
def parse_size(text: str) -> int:
    """'268435456', '256M', '1.5G' -> bytes (K, M, G are powers of 1024)."""
    import argparse

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
    g.add_argument("--answer-cache", default="off", choices=BACKENDS,
                   help="off (default), memory (this process) or redis (shared, --answer-cache-redis-url)")
    g.add_argument("--answer-cache-ttl", type=float, default=3600.0, metavar="S", help="seconds an answer is kept")
    g.add_argument("--answer-cache-max-bytes", type=parse_size, default=256 << 20, metavar="SIZE",
                   help="memory backend bound, LRU by bytes (e.g. 256M; default 256M)")
    g.add_argument("--answer-cache-max-entry-bytes", type=parse_size, default=4 << 20, metavar="SIZE",
                   help="larger answers are not stored (default 4M)")
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


def wrap(app, cfg: AnswerCacheConfig | None, registry: CollectorRegistry):
    """`app` behind the answer cache when enabled (metrics in `registry`), else `app` itself."""
    if cfg is None or not cfg.enabled:
        return app
    return AnswerCacheMiddleware(app, AnswerCache(cfg, registry))
