"""The answer cache's settings, checked once at start-up."""
from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("off", "memory", "redis")


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
