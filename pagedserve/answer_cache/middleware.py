"""The ASGI middleware the router and the server put in front of their apps: hits are answered here,
misses run the app and store its answer once it went out whole."""
from __future__ import annotations

from prometheus_client import CollectorRegistry

from pagedserve.answer_cache.cache import AnswerCache, Lookup
from pagedserve.answer_cache.config import AnswerCacheConfig
from pagedserve.answer_cache.entry import CachedAnswer, complete_answer

CACHE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
_HEADER = b"x-answer-cache"
MAX_BODY_BYTES = 16 << 20  # larger request bodies are not keyed (the server refuses them anyway)


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


def wrap(app, cfg: AnswerCacheConfig | None, registry: CollectorRegistry):
    """`app` behind the answer cache when enabled (metrics in `registry`), else `app` itself."""
    if cfg is None or not cfg.enabled:
        return app
    return AnswerCacheMiddleware(app, AnswerCache(cfg, registry))
