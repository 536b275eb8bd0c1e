"""Which requests are cacheable, and the key of each: path, credentials, salt and canonical body."""
from __future__ import annotations

import hashlib
import json

IGNORED_FIELDS = frozenset({"user"})  # fields that label the request without changing the answer


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
