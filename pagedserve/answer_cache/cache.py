"""Lookups, stores and metrics over one backend."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily

from pagedserve.answer_cache.config import AnswerCacheConfig
from pagedserve.answer_cache.entry import CachedAnswer
from pagedserve.answer_cache.keys import cache_directives, cache_key, deterministic
from pagedserve.answer_cache.memory import Backend, InMemoryBackend
from pagedserve.answer_cache.redis_backend import RedisBackend


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
