"""The shared backend: entries in Redis, whose failures turn into misses, never errors."""
from __future__ import annotations

import logging
import time

log = logging.getLogger("pagedserve.answer_cache")


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
