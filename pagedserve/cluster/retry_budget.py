"""When the router may send a failed request to another backend.

Two dangers, two bounds (Envoy's retry budgets and its "retry on reset" caveats):

- A retry storm: when backends fail, retries multiply the load on the survivors. Retries in
  flight are capped at a fraction of active requests (`RetryBudget`, default 20%, at least
  3), on top of the per-request bound (--max-retries).
- A poison request: one that kills the backend serving it would, if replayed, kill the next
  one, and so on through the cluster. So only attempts that certainly did no work are
  retried freely (connection refused, 429, a 503 with Retry-After: "not ready, come back").
  A connection reset before the answer is retried at most once, and only when the backend
  died with other requests in flight (so this one is not the likely culprit) and the same
  request body has not been at a backend death before (`PoisonRegistry`). A 5xx without
  Retry-After (the engine died under the request, or failed on it) is never retried.
"""
from __future__ import annotations

import collections
import hashlib
import time
from dataclasses import dataclass, field


@dataclass
class RetryBudget:
    ratio: float = 0.2  # retries in flight / active requests
    min_concurrency: int = 3  # retries always allowed in flight, however few requests are active
    active_requests: int = 0
    active_retries: int = 0
    exhausted: int = 0  # retries refused because the budget was spent (for /metrics and logs)

    def try_acquire(self) -> bool:
        if self.active_retries < max(self.min_concurrency, int(self.ratio * self.active_requests)):
            self.active_retries += 1
            return True
        self.exhausted += 1
        return False

    def release(self) -> None:
        self.active_retries -= 1


@dataclass
class PoisonRegistry:
    """Fingerprints of request bodies that were in flight when a backend died."""

    ttl_s: float = 600.0
    max_entries: int = 4096
    _seen: collections.OrderedDict = field(default_factory=collections.OrderedDict)

    @staticmethod
    def fingerprint(path: str, body: bytes) -> bytes:
        return hashlib.blake2b(path.encode() + b"\0" + body, digest_size=16).digest()

    def suspect(self, fp: bytes) -> bool:
        t = self._seen.get(fp)
        if t is None:
            return False
        if time.monotonic() - t > self.ttl_s:
            del self._seen[fp]
            return False
        return True

    def record(self, fp: bytes) -> None:
        self._seen[fp] = time.monotonic()
        self._seen.move_to_end(fp)
        while len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)
