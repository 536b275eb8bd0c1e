"""A lean HTTP/1.1 client for the router's hot path: pooled keep-alive connections to the
backends, httptools' C parser (chunked decoding included), body chunks handed over as the
parser produces them (no re-encoding, no extra copies).

httpx costs about 0.5 ms of CPU per request; this costs a few tens of microseconds, which
is what lets one router process keep up with many replicas. The router still uses httpx
for its low-rate control traffic (health checks, metrics scrapes, /v1/models).
"""
from __future__ import annotations

import asyncio
import collections
import ssl as ssl_mod
import time
from urllib.parse import urlsplit

import httptools


class UpstreamError(Exception):
    """Base class; `connect` errors mean the request never reached the backend."""


class ConnectError(UpstreamError):
    pass


class ReadTimeout(UpstreamError):
    pass


class RemoteClosed(UpstreamError):
    """The connection closed or broke (reset, bad HTTP) before the response was complete."""


_HIGH_WATER = 1 << 20  # pause reading from a backend while this much body waits for a slow client


class _Conn(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.used = 0  # responses received on this connection
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.keep_alive = True
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False
        self.error: UpstreamError | None = None
        self.waiter: asyncio.Future | None = None

    # -- asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # pragma: no cover
            self.error = RemoteClosed("unexpected protocol upgrade")
            self.transport.close()
        except httptools.HttpParserError as e:
            self.error = RemoteClosed(f"invalid HTTP from backend: {e}")
            self.transport.close()
        self._wake()

    def eof_received(self):
        return None  # close the transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        if not self.complete and self.error is None:
            self.error = RemoteClosed(f"connection closed by the backend{': ' + str(exc) if exc else ''}")
        self._wake()

    # -- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self.complete = True

    # -- waiting
    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait(self, timeout: float | None) -> None:
        self.waiter = w = self.loop.create_future()
        handle = self.loop.call_later(timeout, self._time_out, w) if timeout else None
        try:
            if await w is _TIMEOUT:
                raise ReadTimeout(f"no data from the backend for {timeout:.0f}s")
        finally:
            self.waiter = None
            if handle is not None:
                handle.cancel()

    @staticmethod
    def _time_out(w: asyncio.Future) -> None:
        if not w.done():
            w.set_result(_TIMEOUT)


_TIMEOUT = object()


class Response:
    """A backend's answer: status and headers are known; the body is read with `next_chunk`
    (None at the end) or `aread`. Always `close()` it (the connection goes back to the pool
    only after a complete keep-alive response)."""

    __slots__ = ("status", "headers", "sent_at", "_conn", "_pool", "_key", "_timeout")

    def __init__(self, conn: _Conn, pool: "UpstreamPool", key, timeout, sent_at: float = 0.0):
        self._conn, self._pool, self._key, self._timeout = conn, pool, key, timeout
        self.status = conn.status
        self.headers = conn.headers
        self.sent_at = sent_at  # perf_counter() when the request was written (after any connect)

    async def next_chunk(self) -> bytes | None:
        c = self._conn
        while True:
            if c.chunks:  # everything already here goes out in one piece (fewer writes when behind)
                chunk = c.chunks.popleft() if len(c.chunks) == 1 else b"".join(c.chunks)
                c.chunks.clear()
                c.buffered -= len(chunk)
                if c.paused and c.buffered < _HIGH_WATER // 2 and not c.closed:
                    c.paused = False
                    c.transport.resume_reading()
                return chunk
            if c.complete:
                return None
            if c.error is not None:
                raise c.error
            await c.wait(self._timeout)

    async def aread(self) -> bytes:
        parts = []
        while (chunk := await self.next_chunk()) is not None:
            parts.append(chunk)
        return b"".join(parts)

    def close(self) -> None:
        c = self._conn
        if c is None:
            return
        self._conn = None
        if c.complete and c.keep_alive and not c.closed and not c.chunks:
            self._pool._release(self._key, c)
        elif not c.closed:
            c.transport.close()


class UpstreamPool:
    def __init__(self, connect_timeout: float = 3.0, read_timeout: float | None = 600.0,
                 idle_timeout: float = 4.0, max_idle_per_backend: int = 512):
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout  # below uvicorn's default keep-alive (5 s)
        self.max_idle = max_idle_per_backend
        self._idle: dict[tuple, list[_Conn]] = {}
        self._keys: dict[str, tuple] = {}
        self._ssl: ssl_mod.SSLContext | None = None

    def _key(self, base_url: str) -> tuple:
        k = self._keys.get(base_url)
        if k is None:
            u = urlsplit(base_url)
            tls = u.scheme == "https"
            k = (u.hostname, u.port or (443 if tls else 80), tls, u.netloc.encode("latin-1"))
            self._keys[base_url] = k
        return k

    async def _connect(self, key) -> _Conn:
        host, port, tls, _ = key
        loop = asyncio.get_running_loop()
        if tls and self._ssl is None:
            self._ssl = ssl_mod.create_default_context()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Conn(loop), host, port, ssl=self._ssl if tls else None),
                self.connect_timeout)
        except asyncio.TimeoutError:
            raise ConnectError(f"connect timeout after {self.connect_timeout:.0f}s") from None
        except OSError as e:
            raise ConnectError(e.strerror or str(e)) from None
        return conn

    def _acquire_idle(self, key) -> _Conn | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            c = idle.pop()
            if not c.closed and now - c.idle_since < self.idle_timeout:
                return c
            if not c.closed:
                c.transport.close()
        return None

    def _release(self, key, c: _Conn) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) >= self.max_idle:
            c.transport.close()
            return
        c._reset()
        c.idle_since = time.monotonic()
        idle.append(c)

    async def request(self, base_url: str, method: str, target: str, headers: list[tuple[bytes, bytes]],
                      body: bytes) -> Response:
        """Send a request; return once the response headers arrived."""
        key = self._key(base_url)
        head = b"".join((method.encode("latin-1"), b" ", target.encode("latin-1"), b" HTTP/1.1\r\nhost: ", key[3],
                         b"\r\n", *(b"%s: %s\r\n" % kv for kv in headers),
                         b"content-length: %d\r\n\r\n" % len(body)))
        for _ in range(2):
            conn = self._acquire_idle(key)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(key)
            sent_at = time.perf_counter()
            conn.transport.write(head + body if len(body) < 65536 else head)
            if len(body) >= 65536:
                conn.transport.write(body)
            try:
                while not conn.headers_done:
                    if conn.error is not None:
                        raise conn.error
                    await conn.wait(self.read_timeout)
            except RemoteClosed:
                conn.transport.close()
                if reused and not conn.headers:  # a stale keep-alive connection: once more on a fresh one
                    continue
                raise
            except BaseException:
                conn.transport.close()
                raise
            conn.used += 1
            return Response(conn, self, key, self.read_timeout, sent_at)
        raise RemoteClosed("connection closed by the backend")  # pragma: no cover

    def close(self) -> None:
        for idle in self._idle.values():
            for c in idle:
                if not c.closed:
                    c.transport.close()
        self._idle.clear()
