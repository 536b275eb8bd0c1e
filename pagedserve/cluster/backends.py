"""Backend (replica) state shared by the router, its policies and the launcher.

A backend is routable when it is `healthy`. It leaves that state through an active
health-check failure, a passive ejection (connect error, repeated 5xx) or the launcher
seeing its process die; it comes back only through a passing health check once any
ejection period is over (ejection periods double on repeated ejections, like Envoy's
outlier detection).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

log = logging.getLogger("pagedserve.router")


def normalize_url(url: str) -> str:
    """'host:port' or 'http://host:port/' -> 'http://host:port' (no trailing slash)."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"backend URL must look like http://host:port, got {url!r}")
    return url.rstrip("/")


@dataclass(eq=False)
class Backend:
    url: str
    healthy: bool = True
    # Router-side load: requests in flight through this router and their estimated tokens.
    inflight: int = 0
    inflight_tokens: int = 0
    # Engine load scraped from the backend's /metrics (None until the first scrape).
    running: float | None = None
    waiting: float | None = None
    kv_usage: float | None = None
    gpu_util: float | None = None  # 0..100, from NVML / nvidia-smi (local) or the backend's metrics
    inflight_at_scrape: int = 0  # router-side in-flight when the metrics were scraped
    metrics_time: float = 0.0
    # Health bookkeeping.
    consecutive_failures: int = 0
    health_failures: int = 0
    ejections: int = 0
    ejected_until: float = 0.0
    last_ejection: float = 0.0
    reason: str = ""  # why it is unhealthy
    models: frozenset = frozenset()
    gpu_index: int | None = None  # set by the launcher for a local replica on a GPU
    meta: dict = field(default_factory=dict)  # launcher info (pid, restarts) for /admin/backends
    total_requests: int = 0
    # Cached prometheus children (set by the router).
    m: object = None

    def __post_init__(self) -> None:
        self.url = normalize_url(self.url)

    def __repr__(self) -> str:
        return f"Backend({self.url}, healthy={self.healthy}, inflight={self.inflight})"

    @property
    def queued_estimate(self) -> float:
        """Requests on the engine now: last scraped running+waiting, corrected by what this
        router has sent or seen finish since that scrape (the scrape is up to an interval old)."""
        base = (self.running or 0.0) + (self.waiting or 0.0)
        return max(0.0, base + self.inflight - self.inflight_at_scrape)

    def snapshot(self) -> dict:
        now = time.monotonic()
        return {
            "url": self.url,
            "healthy": self.healthy,
            "reason": self.reason or None,
            "inflight": self.inflight,
            "inflight_tokens": self.inflight_tokens,
            "running": self.running,
            "waiting": self.waiting,
            "kv_cache_usage": self.kv_usage,
            "gpu_util": self.gpu_util,
            "ejections": self.ejections,
            "ejected_for_s": round(max(0.0, self.ejected_until - now), 3),
            "requests": self.total_requests,
            "models": sorted(self.models),
            **self.meta,
        }


class BackendPool:
    """The set of backends, in insertion order, with a cached list of the healthy ones."""

    def __init__(self, *, eject_base_s: float = 1.0, eject_max_s: float = 30.0, failures_to_eject: int = 3):
        self._by_url: dict[str, Backend] = {}
        self._healthy: list[Backend] = []
        self.version = 0  # bumped on membership changes (policies rebuild their rings)
        self.eject_base_s = eject_base_s
        self.eject_max_s = eject_max_s
        self.failures_to_eject = failures_to_eject
        self.on_change = None  # callback(backend) for metrics

    # -- membership
    def add(self, url: str, *, healthy: bool = True, **kw) -> Backend:
        b = Backend(url, healthy=healthy, **kw)
        if b.url in self._by_url:
            return self._by_url[b.url]
        if not healthy:
            b.reason = "not checked yet"
        self._by_url[b.url] = b
        self.version += 1
        self._refresh()
        log.info("backend added: %s", b.url)
        return b

    def remove(self, url: str) -> Backend | None:
        b = self._by_url.pop(normalize_url(url), None)
        if b is not None:
            b.healthy = False
            b.reason = "removed"
            self.version += 1
            self._refresh()
            log.info("backend removed: %s (%d requests still in flight drain)", b.url, b.inflight)
        return b

    def get(self, url: str) -> Backend | None:
        return self._by_url.get(normalize_url(url))

    @property
    def all(self) -> list[Backend]:
        return list(self._by_url.values())

    @property
    def healthy(self) -> list[Backend]:
        return self._healthy

    def __len__(self) -> int:
        return len(self._by_url)

    def _refresh(self) -> None:
        self._healthy = [b for b in self._by_url.values() if b.healthy]

    # -- state transitions
    def mark_down(self, b: Backend, reason: str, *, eject: bool = False) -> None:
        """Stop routing to `b`. With eject=True it also sits out an ejection period that
        doubles on each ejection within a minute of the previous one."""
        now = time.monotonic()
        if eject:
            if now - b.last_ejection > 60.0:
                b.ejections = 0
            b.ejections += 1
            b.last_ejection = now
            b.ejected_until = now + min(self.eject_max_s, self.eject_base_s * 2 ** (b.ejections - 1))
        if b.healthy:
            log.warning("backend %s marked unhealthy: %s%s", b.url, reason,
                        f" (ejected for {b.ejected_until - now:.1f}s)" if eject else "")
        b.healthy = False
        b.reason = reason
        self._refresh()
        if self.on_change:
            self.on_change(b)

    def mark_up(self, b: Backend) -> bool:
        """A health check passed: readmit `b` unless its ejection period is still running."""
        b.health_failures = 0
        if b.healthy:
            return True
        if time.monotonic() < b.ejected_until or b.url not in self._by_url:
            return False
        log.info("backend %s healthy again, readmitted", b.url)
        b.healthy = True
        b.reason = ""
        b.consecutive_failures = 0
        self._refresh()
        if self.on_change:
            self.on_change(b)
        return True

    def record_success(self, b: Backend) -> None:
        b.consecutive_failures = 0

    def record_failure(self, b: Backend, reason: str, *, connect: bool = False) -> None:
        """A request failed on `b` before its first byte (connect error, 5xx, reset).
        Connect errors eject at once; other failures after `failures_to_eject` in a row."""
        b.consecutive_failures += 1
        if b.healthy and (connect or b.consecutive_failures >= self.failures_to_eject):
            self.mark_down(b, reason, eject=True)
