"""The answer cache: keying and determinism, LRU by bytes, TTL (injected clock), and end to end
through a real router in front of the bench mock server (hits byte-identical, the upstream sees
one request, non-deterministic requests never hit, no-cache / no-store, incomplete answers never
stored), two routers sharing one real Redis, the CLI's start-up errors, and one real engine server."""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time

import httpx
import openai
import pytest

from pagedserve.answer_cache.args import parse_size
from pagedserve.answer_cache.cache import AnswerCache
from pagedserve.answer_cache.config import AnswerCacheConfig
from pagedserve.answer_cache.entry import CachedAnswer, complete_answer
from pagedserve.answer_cache.keys import cache_directives, cache_key, deterministic
from pagedserve.answer_cache.memory import InMemoryBackend
from pagedserve.answer_cache.middleware import AnswerCacheMiddleware
from pagedserve.answer_cache.redis_backend import RedisBackend
from tests.doubles.mock_openai_server import MockServer
from pagedserve.cluster.router import Router, RouterConfig
from pagedserve.cluster.uvicorn_server import start_server
from pagedserve.ports import free_port


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# ---------------------------------------------------------------------------- unit
@pytest.mark.parametrize("body, ok", [
    ({"temperature": 0}, True), ({"temperature": 0.0, "n": 3}, True), ({"seed": 7}, True),
    ({"temperature": 0.9, "seed": 0}, True), ({"top_k": 1, "temperature": 1.0}, True),
    ({}, False),  # OpenAI's default temperature is 1
    ({"temperature": 0.7}, False), ({"temperature": 0.7, "n": 2}, False), ({"seed": None}, False),
    ({"seed": True}, False), ({"temperature": "0"}, False), ({"temperature": False}, False), ({"top_k": 5}, False),
])
def test_deterministic(body, ok):
    assert deterministic({"model": "m", "prompt": "p", **body}) is ok


def test_key_canonical_form():
    base = {"model": "m", "prompt": "hi", "temperature": 0, "max_tokens": 5}
    k = cache_key("/v1/completions", base)
    assert k.startswith("m:")
    # key order, nulls, `user` and an explicit stream=false do not change the key
    assert cache_key("/v1/completions", dict(reversed(list(base.items())))) == k
    assert cache_key("/v1/completions", {**base, "user": "alice", "seed": None, "stream": False}) == k
    different = [
        cache_key("/v1/chat/completions", base),
        cache_key("/v1/completions", {**base, "stream": True}),
        cache_key("/v1/completions", {**base, "max_tokens": 6}),
        cache_key("/v1/completions", {**base, "prompt": "hi "}),
        cache_key("/v1/completions", {**base, "model": "other"}),
        cache_key("/v1/completions", {**base, "stream": True, "stream_options": {"include_usage": True}}),
        cache_key("/v1/completions", base, auth=b"Bearer a"),
        cache_key("/v1/completions", base, salt="server-key"),
    ]
    assert len({k, *different}) == len(different) + 1


def test_cache_control_directives():
    assert cache_directives([]) == (False, False)
    assert cache_directives([(b"cache-control", b"No-Cache")]) == (True, False)
    assert cache_directives([(b"cache-control", b"max-age=0, no-store")]) == (True, True)
    assert cache_directives([(b"x-other", b"no-cache")]) == (False, False)


def test_complete_answer():
    sse = b"text/event-stream; charset=utf-8"
    assert complete_answer(200, b"application/json", b"{}")
    assert not complete_answer(500, b"application/json", b"{}")
    assert not complete_answer(200, b"text/plain", b"x")
    assert complete_answer(200, sse, b'data: {"x":1}\n\ndata: [DONE]\n\n')
    assert not complete_answer(200, sse, b'data: {"x":1}\n\n')  # cut short
    assert not complete_answer(200, sse, b'data: {"x":1}\n\ndata: {"error": {"message": "boom"}}\n\ndata: [DONE]\n\n')


def test_entry_roundtrip_and_sizes():
    a = CachedAnswer(b"text/event-stream", b"data: a\n\nline\n")
    assert CachedAnswer.decode(a.encode()) == a and a.stream
    assert parse_size("256M") == 256 << 20 and parse_size("1.5G") == int(1.5 * (1 << 30)) and parse_size("4096") == 4096
    with pytest.raises(Exception, match="not a size"):
        parse_size("lots")


def test_lru_by_bytes_bound():
    evicted = []
    b = InMemoryBackend(max_bytes=1000, clock=Clock(), on_evict=evicted.append)
    v = b"x" * 298  # + 2-byte key = 300 bytes an entry: three fit
    for k in ("k1", "k2", "k3"):
        assert b.set_now(k, v, 60)
    assert b.bytes == 900 and len(b) == 3
    assert b.get_now("k1") == v  # k1 is now the most recent; k2 the least
    b.set_now("k4", v, 60)
    assert b.get_now("k2") is None and b.get_now("k1") == v and evicted == ["size"]
    for i in range(20):
        b.set_now(f"{i:02d}", v, 60)
        assert b.bytes <= 1000
    assert not b.set_now("big", b"x" * 1001, 60)  # larger than the whole bound: not stored, nothing evicted
    assert b.bytes <= 1000 and b.bytes == sum(len(k) + len(x) for k, (x, _) in b._data.items())
    b.set_now("19", b"short", 60)  # replacing an entry re-counts its bytes
    assert b.bytes == sum(len(k) + len(x) for k, (x, _) in b._data.items())


def test_ttl_with_injected_clock():
    clock, evicted = Clock(), []
    b = InMemoryBackend(max_bytes=1 << 20, clock=clock, on_evict=evicted.append)
    b.set_now("a", b"1", ttl=10)
    clock.t += 9.9
    assert b.get_now("a") == b"1"
    clock.t += 0.2
    assert b.get_now("a") is None and evicted == ["expired"] and b.bytes == 0 and len(b) == 0


async def test_cache_metrics_and_lookup():
    cfg = AnswerCacheConfig(backend="memory", ttl=60, max_bytes=1 << 20)
    cache = AnswerCache(cfg, clock=Clock())
    body = json.dumps({"model": "m", "prompt": "p", "temperature": 0}).encode()
    path = "/v1/completions"
    assert (await cache.lookup(path, [], body)).status == "miss"
    look = await cache.lookup(path, [], body)
    await cache.store(look.key, CachedAnswer(b"application/json", b'{"a":1}'))
    hit = await cache.lookup(path, [], body)
    assert hit.status == "hit" and hit.answer.body == b'{"a":1}'
    assert (await cache.lookup(path, [(b"authorization", b"Bearer other")], body)).status == "miss"
    assert (await cache.lookup(path, [(b"cache-control", b"no-cache")], body)).status == "bypass"
    assert (await cache.lookup(path, [], b'{"model": "m", "prompt": "p"}')).status == "bypass"
    assert (await cache.lookup(path, [], b"not json")).status == "bypass"
    text = cache_metrics_text(cache)
    assert "pagedserve:answer_cache_hits_total 1.0" in text
    assert "pagedserve:answer_cache_misses_total 3.0" in text
    assert 'pagedserve:answer_cache_bypasses_total{reason="nondeterministic"} 1.0' in text
    assert 'pagedserve:answer_cache_bypasses_total{reason="no_cache"} 1.0' in text
    assert 'pagedserve:answer_cache_bypasses_total{reason="invalid"} 1.0' in text
    assert "pagedserve:answer_cache_stores_total 1.0" in text
    assert "pagedserve:answer_cache_entries 1.0" in text


def cache_metrics_text(cache: AnswerCache) -> str:
    from prometheus_client import generate_latest

    return generate_latest(cache.registry).decode()


async def test_middleware_large_body_passes_through_whole(monkeypatch):
    """A body over the keying limit is not buffered whole: the app still receives every byte, in order."""
    import pagedserve.answer_cache.middleware as ac

    monkeypatch.setattr(ac, "MAX_BODY_BYTES", 100)
    got = []

    async def app(scope, receive, send):
        while True:
            msg = await receive()
            got.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})

    body = json.dumps(comp("x" * 400)).encode()
    chunks = [body[i:i + 64] for i in range(0, len(body), 64)]
    incoming, sent = [], []

    async def receive():
        return incoming.pop(0)

    async def send(msg):
        sent.append(msg)

    cache = AnswerCache(AnswerCacheConfig(backend="memory"))
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
    for _ in range(2):
        incoming[:] = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                       for i, c in enumerate(chunks)]
        got.clear()
        await AnswerCacheMiddleware(app, cache)(scope, receive, send)
        assert b"".join(got) == body
        assert (b"x-answer-cache", b"bypass") in sent[-2]["headers"]
    assert len(cache.backend) == 0
    assert 'reason="invalid"} 2.0' in cache_metrics_text(cache)


# ---------------------------------------------------------------------------- router + mock server
class Stack:
    """A mock OpenAI server, a real router in front of it, the answer cache in front of the router."""

    def __init__(self):
        self.mocks: list[MockServer] = []
        self.servers = []

    async def mock(self, **kw) -> tuple[MockServer, str]:
        m = MockServer(**{"ttft": 0.0, "itl": 0.0, **kw})
        port = await m.start()
        self.mocks.append(m)
        return m, f"http://127.0.0.1:{port}"

    async def router(self, backend_url: str, cfg: AnswerCacheConfig | None = None, clock=None,
                     backend=None) -> tuple[str, AnswerCache]:
        router = Router([backend_url], RouterConfig(health_interval=0.2, max_retries=0))
        cache = AnswerCache(cfg or AnswerCacheConfig(backend="memory"), router.registry, backend=backend,
                            **({"clock": clock} if clock else {}))
        server, task, port = await start_server(AnswerCacheMiddleware(router, cache), "127.0.0.1", 0,
                                                log_level="critical")
        self.servers.append((server, task))
        return f"http://127.0.0.1:{port}", cache

    async def close(self):
        for server, task in self.servers:
            server.should_exit = True
            await task
        for m in self.mocks:
            await m.close()


@pytest.fixture
async def stack():
    s = Stack()
    yield s
    await s.close()


def comp(prompt="hello there", **kw):
    return {"model": "mock", "prompt": prompt, "max_tokens": 4, "temperature": 0, **kw}


def chat(content="hello there", **kw):
    return {"model": "mock", "messages": [{"role": "user", "content": content}], "max_tokens": 4,
            "temperature": 0, **kw}


async def post(client, path, body, headers=None) -> httpx.Response:
    return await client.post(path, json=body, headers=headers or {})


async def post_stream(client, path, body, headers=None) -> tuple[httpx.Response, bytes]:
    async with client.stream("POST", path, json=body, headers=headers or {}) as r:
        raw = b"".join([c async for c in r.aiter_raw()])
    return r, raw


async def test_router_hit_is_byte_identical(stack):
    mock, up = await stack.mock()
    url, cache = await stack.router(up)
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        first = {}
        for path, body in (("/v1/completions", comp()), ("/v1/chat/completions", chat())):
            r1 = await post(c, path, body)
            r2 = await post(c, path, body)
            assert r1.status_code == r2.status_code == 200
            assert (r1.headers["x-answer-cache"], r2.headers["x-answer-cache"]) == ("miss", "hit")
            assert r2.content == r1.content and r2.headers["content-type"] == r1.headers["content-type"]
            first[path] = r1.content
        assert mock.requests == 2  # one per endpoint; both second requests came from the cache
        # `user` and key order do not matter; another prompt is another entry
        r3 = await post(c, "/v1/completions", dict(reversed(list(comp(user="bob").items()))))
        assert r3.headers["x-answer-cache"] == "hit" and r3.content == first["/v1/completions"]
        r4 = await post(c, "/v1/completions", comp("another prompt"))
        assert r4.headers["x-answer-cache"] == "miss"
        assert mock.requests == 3
        metrics = (await c.get("/metrics")).text
    assert "pagedserve:answer_cache_hits_total 3.0" in metrics
    assert "pagedserve:answer_cache_stores_total 3.0" in metrics
    assert "pagedserve:router_requests_total" in metrics  # the router's own registry, same endpoint


async def test_router_stream_replay_byte_identical(stack):
    mock, up = await stack.mock(itl=0.002)
    url, _ = await stack.router(up)
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        for path, body in (("/v1/chat/completions", chat(stream=True)),
                           ("/v1/completions", comp(stream=True, stream_options={"include_usage": True}))):
            r1, raw1 = await post_stream(c, path, body)
            r2, raw2 = await post_stream(c, path, body)
            assert (r1.headers["x-answer-cache"], r2.headers["x-answer-cache"]) == ("miss", "hit")
            assert r2.headers["content-type"].startswith("text/event-stream")
            assert raw2 == raw1 and raw1.endswith(b"data: [DONE]\n\n") and raw1.count(b"data: ") >= 5
        # the JSON form of the same request is a different answer: a miss, not the stream's bytes
        r3 = await post(c, "/v1/chat/completions", chat())
        assert r3.headers["x-answer-cache"] == "miss" and r3.headers["content-type"] == "application/json"
    assert mock.requests == 3


async def test_openai_client_through_router(stack):
    mock, up = await stack.mock()
    url, _ = await stack.router(up)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="sk-x", max_retries=0)
    kw = dict(model="mock", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0)
    raw1 = await client.chat.completions.with_raw_response.create(**kw)
    raw2 = await client.chat.completions.with_raw_response.create(**kw)
    assert (raw1.headers["x-answer-cache"], raw2.headers["x-answer-cache"]) == ("miss", "hit")
    a, b = raw1.parse(), raw2.parse()
    assert a.id == b.id and a.choices[0].message.content == b.choices[0].message.content == " the" * 5
    texts = []
    for _ in range(2):
        stream = await client.chat.completions.create(**kw, stream=True)
        texts.append([ch.choices[0].delta.content async for ch in stream if ch.choices])
    assert texts[0] == texts[1] and "".join(t or "" for t in texts[0]) == " the" * 5
    assert mock.requests == 2
    # another API key never shares the first key's entries
    other = openai.AsyncOpenAI(base_url=url + "/v1", api_key="sk-y", max_retries=0)
    raw3 = await other.chat.completions.with_raw_response.create(**kw)
    assert raw3.headers["x-answer-cache"] == "miss" and mock.requests == 3
    await client.close()
    await other.close()


async def test_nondeterministic_never_hits(stack):
    mock, up = await stack.mock()
    url, cache = await stack.router(up)
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        for body in (comp(temperature=0.7), {k: v for k, v in comp().items() if k != "temperature"},
                     comp(temperature=1.0, n=2)):
            seen = [(await post(c, "/v1/completions", body)).headers["x-answer-cache"] for _ in range(3)]
            assert seen == ["bypass"] * 3
        assert mock.requests == 9 and len(cache.backend) == 0
        # a fixed seed makes sampling reproducible: cached
        seeded = comp(temperature=0.7, seed=42)
        assert [(await post(c, "/v1/completions", seeded)).headers["x-answer-cache"] for _ in range(2)] == \
            ["miss", "hit"]
    assert mock.requests == 10


async def test_no_cache_refreshes_and_no_store_skips(stack):
    mock, up = await stack.mock()
    url, _ = await stack.router(up)
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        r1 = await post(c, "/v1/completions", comp())
        r2 = await post(c, "/v1/completions", comp(), {"Cache-Control": "no-cache"})
        assert r2.headers["x-answer-cache"] == "bypass" and mock.requests == 2
        assert json.loads(r2.content)["id"] != json.loads(r1.content)["id"]  # a fresh answer...
        r3 = await post(c, "/v1/completions", comp())
        assert r3.headers["x-answer-cache"] == "hit" and r3.content == r2.content  # ...that refreshed the entry
        body = comp("private")
        r4 = await post(c, "/v1/completions", body, {"Cache-Control": "no-store"})
        r5 = await post(c, "/v1/completions", body)
        assert r4.headers["x-answer-cache"] == "bypass" and r5.headers["x-answer-cache"] == "miss"
        assert mock.requests == 4


async def test_ttl_expiry_through_router(stack):
    mock, up = await stack.mock()
    clock = Clock()
    url, _ = await stack.router(up, AnswerCacheConfig(backend="memory", ttl=30), clock=clock)
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        assert (await post(c, "/v1/completions", comp())).headers["x-answer-cache"] == "miss"
        clock.t += 29
        assert (await post(c, "/v1/completions", comp())).headers["x-answer-cache"] == "hit"
        clock.t += 2
        assert (await post(c, "/v1/completions", comp())).headers["x-answer-cache"] == "miss"
        metrics = (await c.get("/metrics")).text
    assert mock.requests == 2
    assert 'pagedserve:answer_cache_evictions_total{reason="expired"} 1.0' in metrics


async def test_size_bound_through_router(stack):
    mock, up = await stack.mock()
    size = len(CachedAnswer(b"application/json", b"").encode())
    async with httpx.AsyncClient(base_url=up, timeout=10) as c:  # one answer's size, straight from the mock
        size += len((await post(c, "/v1/completions", comp("prompt 00"))).content) + 80
    bound = 3 * size  # room for about three answers
    url, cache = await stack.router(up, AnswerCacheConfig(backend="memory", max_bytes=bound))
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        for i in range(10):
            assert (await post(c, "/v1/completions", comp(f"prompt {i:02d}"))).headers["x-answer-cache"] == "miss"
            assert cache.backend.bytes <= bound
        assert 2 <= len(cache.backend) <= 3
        assert (await post(c, "/v1/completions", comp("prompt 09"))).headers["x-answer-cache"] == "hit"
        assert (await post(c, "/v1/completions", comp("prompt 00"))).headers["x-answer-cache"] == "miss"
        metrics = (await c.get("/metrics")).text
    values = {ln.split()[0]: float(ln.split()[1]) for ln in metrics.splitlines() if ln.startswith("pagedserve:answer")}
    assert values["pagedserve:answer_cache_bytes"] <= bound
    assert values['pagedserve:answer_cache_evictions_total{reason="size"}'] >= 7


async def test_only_complete_successful_answers_are_stored(stack):
    mock, up = await stack.mock(itl=0.002)
    url, cache = await stack.router(up)
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        for _ in range(2):  # HTTP errors pass through and are asked again
            r = await post(c, "/v1/completions", comp("[[http500]]"))
            assert r.status_code == 500 and r.headers["x-answer-cache"] == "miss"
        for marker in ("[[nodone]]", "[[break]]"):  # a stream without [DONE], one the router ends with an error
            for _ in range(2):
                r, raw = await post_stream(c, "/v1/completions", comp(marker, stream=True))
                assert r.headers["x-answer-cache"] == "miss"
            if marker == "[[break]]":
                assert b'"error"' in raw
    assert mock.requests == 6 and len(cache.backend) == 0


async def test_client_disconnect_mid_stream_stores_nothing(stack):
    mock, up = await stack.mock(itl=0.05)
    url, cache = await stack.router(up)
    body = comp(stream=True, max_tokens=40)
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        async with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.headers["x-answer-cache"] == "miss"
            async for _ in r.aiter_raw():
                break  # first chunk, then go away
        await asyncio.sleep(0.3)
        assert len(cache.backend) == 0
        r, raw = await post_stream(c, "/v1/completions", comp(stream=True, max_tokens=3))
        assert r.headers["x-answer-cache"] == "miss" and len(cache.backend) == 1


# ---------------------------------------------------------------------------- Redis
def _redis_server() -> str:
    path = shutil.which("redis-server")
    if path is None:
        pytest.skip("redis-server not found on PATH (Debian/Ubuntu: apt-get install redis-server; .ci/run does this "
                    "as root)")
    return path


class RedisProcess:
    def __init__(self):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen([_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=self.port, socket_timeout=1).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    pytest.skip(f"redis-server did not start on port {self.port}")
                time.sleep(0.05)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def redis_proc():
    r = RedisProcess()
    yield r
    r.stop()


async def test_two_routers_share_one_redis(stack, redis_proc):
    import redis

    mock, up = await stack.mock()
    cfg = AnswerCacheConfig(backend="redis", redis_url=redis_proc.url, ttl=120)
    url_a, _ = await stack.router(up, cfg)
    url_b, _ = await stack.router(up, cfg)
    async with httpx.AsyncClient(timeout=10) as c:
        r1 = await post(c, url_a + "/v1/chat/completions", chat())
        r2 = await post(c, url_b + "/v1/chat/completions", chat())
        assert (r1.headers["x-answer-cache"], r2.headers["x-answer-cache"]) == ("miss", "hit")
        assert r2.content == r1.content
        s1, raw1 = await post_stream(c, url_b + "/v1/completions", comp(stream=True))
        s2, raw2 = await post_stream(c, url_a + "/v1/completions", comp(stream=True))
        assert (s1.headers["x-answer-cache"], s2.headers["x-answer-cache"]) == ("miss", "hit") and raw2 == raw1
    assert mock.requests == 2
    r = redis.Redis.from_url(redis_proc.url)
    keys = r.keys("pagedserve:answer:*")
    assert len(keys) == 2 and all(0 < r.pttl(k) <= 120_000 for k in keys)  # stored with the TTL


async def test_redis_going_away_degrades_to_misses(stack, redis_proc, caplog):
    mock, up = await stack.mock()
    url, cache = await stack.router(up, AnswerCacheConfig(backend="redis", redis_url=redis_proc.url))
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        await post(c, "/v1/completions", comp())
        assert (await post(c, "/v1/completions", comp())).headers["x-answer-cache"] == "hit"
        redis_proc.stop()
        with caplog.at_level("WARNING", logger="pagedserve.answer_cache"):
            for _ in range(3):
                r = await post(c, "/v1/completions", comp())
                assert r.status_code == 200 and r.headers["x-answer-cache"] == "miss"
    assert mock.requests == 4
    assert len([m for m in caplog.messages if "Redis" in m]) == 1  # logged once, not per request


async def test_redis_backend_entry_cap(redis_proc):
    cache = AnswerCache(AnswerCacheConfig(backend="redis", redis_url=redis_proc.url, max_entry_bytes=100))
    await cache.store("big", CachedAnswer(b"application/json", b"x" * 200))
    await cache.store("small", CachedAnswer(b"application/json", b"x" * 20))
    assert await cache.backend.get("big") is None and await cache.backend.get("small") is not None
    await cache.close()
    assert isinstance(cache.backend, RedisBackend)


# ---------------------------------------------------------------------------- CLI
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pagedserve.cli", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("extra, message", [
    (["--answer-cache", "redis"], "needs --answer-cache-redis-url"),
    (["--answer-cache", "redis", "--answer-cache-redis-url", "http://127.0.0.1:1"], "--answer-cache-redis-url"),
    (["--answer-cache", "redis", "--answer-cache-redis-url", f"redis://127.0.0.1:{free_port()}"],
     "cannot reach Redis"),
    (["--answer-cache", "memory", "--answer-cache-ttl", "0"], "--answer-cache-ttl must be > 0"),
])
def test_router_cli_startup_errors(extra, message):
    p = _cli("router", "--port", str(free_port()), "--backend", "http://127.0.0.1:9", *extra)
    assert p.returncode == 1, p.stderr
    assert message in p.stderr and p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr, p.stderr


def test_serve_cli_checks_before_loading_the_model():
    p = _cli("serve", "--port", str(free_port()), "--answer-cache", "redis")
    assert p.returncode == 1 and "needs --answer-cache-redis-url" in p.stderr.strip().splitlines()[-1], p.stderr
    assert "Traceback" not in p.stderr


def test_replicas_leave_the_cache_to_the_router():
    from pagedserve.cluster.launcher import replica_argv

    argv = ["--answer-cache", "memory", "--answer-cache-ttl=5", "--answer-cache-max-bytes", "1M",
            "--answer-cache-redis-url", "redis://x", "--max-model-len", "128"]
    assert replica_argv(argv) == ["--max-model-len", "128"]


def test_cli_bad_size_is_a_usage_error():
    p = _cli("router", "--answer-cache", "memory", "--answer-cache-max-bytes", "lots")
    assert p.returncode == 2 and "not a size" in p.stderr


# ---------------------------------------------------------------------------- the real engine server
def test_real_server_answer_cache(tmp_path):
    from pagedserve.server.launch import ServerProcess
    from tests.tiny_models import tiny_model_dir

    model = tiny_model_dir(tmp_path / "tiny")
    srv = ServerProcess(["--max-model-len", "128", "--max-num-seqs", "4", "--kv-cache-memory", "0.02",
                         "--api-key", "sk-k", "--served-model-name", "tiny", "--answer-cache", "memory",
                         "--disable-log-requests"], model=str(model))
    srv.start()
    try:
        srv.wait_ready(120)
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-k", max_retries=0, timeout=60)
        kw = dict(model="tiny", prompt="the quick brown fox", max_tokens=8, temperature=0)
        raw1 = client.completions.with_raw_response.create(**kw)
        raw2 = client.completions.with_raw_response.create(**kw)
        assert (raw1.headers["x-answer-cache"], raw2.headers["x-answer-cache"]) == ("miss", "hit")
        assert raw2.content == raw1.content and raw1.parse().choices[0].text
        h = {"Authorization": "Bearer sk-k"}
        body = {**kw, "stream": True}
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            streams = []
            for _ in range(2):
                with c.stream("POST", "/v1/completions", json=body, headers=h) as r:
                    streams.append((r.headers["x-answer-cache"], b"".join(r.iter_raw())))
            assert [s[0] for s in streams] == ["miss", "hit"] and streams[0][1] == streams[1][1]
            assert streams[0][1].endswith(b"data: [DONE]\n\n")
            # a wrong key is refused even though the answer is cached
            bad = c.post("/v1/completions", json=kw, headers={"Authorization": "Bearer wrong"})
            assert bad.status_code == 401 and bad.headers["x-answer-cache"] == "miss"
            # sampling without a seed is never cached
            hot = c.post("/v1/completions", json={**kw, "temperature": 0.8}, headers=h)
            assert hot.status_code == 200 and hot.headers["x-answer-cache"] == "bypass"
            metrics = c.get("/metrics").text
        assert "pagedserve:answer_cache_hits_total 2.0" in metrics
        assert "pagedserve:answer_cache_stores_total 2.0" in metrics
        assert "vllm:request_success_total" in metrics  # the server's own metrics, same registry
    finally:
        srv.terminate()
