"""The backend protocol and the per-process backend: LRU by bytes with per-entry expiry."""
from __future__ import annotations

import collections
import threading
import time
from typing import Callable, Protocol


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
