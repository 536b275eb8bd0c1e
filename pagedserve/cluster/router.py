"""The router: an ASGI app that spreads OpenAI-compatible requests over backends.

Hot path, per request: read the body once, parse the few fields policies need (model,
max_tokens, stream, user, a prompt prefix), let the policy pick a healthy backend, forward
the original body bytes over a pooled keep-alive connection, and relay the answer.

- Streaming responses pass through chunk by chunk as received (no re-encoding). The router
  commits to a backend only when its first body bytes arrive. A stream that breaks after
  bytes were sent ends with an SSE error event.
- Retries (retry_budget.py says why): a request that certainly did no work (connection
  refused, 429, a 503 with Retry-After) is retried on another backend, at most `max_retries`
  times and within a budget of 20% of active requests. A reset after sending is retried at
  most once and only when it cannot be the request's fault; a 5xx without Retry-After is
  never retried, so a request that kills its backend cannot walk through the cluster.
- Health: active checks of each backend's /health; passive ejection on connect errors (at
  once) and on repeated resets, timeouts and 503s with Retry-After; readmission when a check
  passes after the ejection period. A 5xx without Retry-After answers one body, so it is
  counted (kind "request_5xx") but never ejects: one client's requests cannot eject replicas.
  With no healthy backend the router answers 503 with an OpenAI-style error.
- A client that disconnects cancels its upstream request (the backend aborts it).

Router-owned paths: /health, /metrics, /v1/models (merged from the backends) and
/admin/backends (GET list, POST {"url"} add, DELETE {"url"} remove; off unless an admin key
is set). Everything else is proxied. HEAD is answered on every path. Request bodies over
16 MiB get 413, heads over the limits in http_limits.py 431/414, JSON nested too deep 400.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from dataclasses import dataclass

import httpx
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pagedserve.cluster import upstream
from pagedserve.cluster.asgi_io import TooLarge, content_length, head_only, read_body
from pagedserve.cluster.backends import Backend, BackendPool, normalize_url
from pagedserve.cluster.policies import DEFAULT_POLICY, Policy, RequestInfo, make_policy
from pagedserve.cluster.request_fields import BadRequest, parse_request
from pagedserve.cluster.retry_budget import PoisonRegistry, RetryBudget
from pagedserve.cluster.scrape import LocalGpuUtil
from pagedserve.cluster.tasks import cancel_tasks
from pagedserve.cluster.upkeep import BackendUpkeep

log = logging.getLogger("pagedserve.router")
disable_created_metrics()  # no *_created series, as vLLM
for _name in ("httpx", "httpcore"):  # one INFO line per proxied request otherwise
    logging.getLogger(_name).setLevel(logging.WARNING)

_REQ_DROP = frozenset({b"host", b"content-length", b"connection", b"keep-alive", b"transfer-encoding",
                       b"te", b"trailer", b"upgrade", b"proxy-authorization", b"proxy-connection", b"expect"})
_RESP_DROP = frozenset({b"content-length", b"connection", b"keep-alive", b"transfer-encoding", b"date",
                        b"server", b"trailer", b"upgrade"})
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
_DEATH_WINDOW_S = 1.0  # failures of one backend this close together are one death
_JSON = [(b"content-type", b"application/json")]


@dataclass
class RouterConfig:
    policy: str = DEFAULT_POLICY
    max_retries: int = 2  # extra attempts on other backends for a request that failed before its first byte
    health_interval: float = 1.0
    health_timeout: float = 3.0
    health_path: str = "/health"
    metrics_interval: float = 0.25  # /metrics scrape period (engine_load, gpu_util)
    connect_timeout: float = 3.0
    request_timeout: float = 600.0  # longest wait for the next bytes from a backend
    failures_to_eject: int = 3  # consecutive resets/timeouts/503s that eject a backend (connect errors: at once)
    eject_base_s: float = 1.0
    admin_api_key: str | None = None  # /admin/* is off (403) unless this is set
    retry_budget_ratio: float = 0.2  # retries in flight at most this fraction of active requests (Envoy: 20%)
    retry_budget_min: int = 3  # ... or this many, whichever is larger
    backends_file: str | None = None  # one URL a line; re-read when it changes
    file_poll_interval: float = 1.0
    prefix_chars: int = 256  # prompt characters hashed by prefix_affinity
    default_max_tokens: int = 256  # token estimate when a request gives no max_tokens
    backend_header: bool = True  # add x-pagedserve-backend to responses
    load_factor: float = 1.25  # prefix_affinity's bound on a backend's share


def _error_body(message: str, status: int, type_: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": status}}).encode()


class _Failure:
    """An attempt that failed before anything reached the client (so it may be retried)."""

    __slots__ = ("message", "status", "headers", "body", "retry", "reset", "peers")

    def __init__(self, message: str, status: int = 502, headers=None, body: bytes | None = None, retry: bool = True,
                 reset: bool = False, peers: int = 0):
        self.message, self.status, self.headers, self.body = message, status, headers, body
        self.retry = retry  # False for timeouts and 5xx: the backend did (or may still do) work on it
        self.reset = reset  # the connection broke after the request was sent: maybe this request's doing
        self.peers = peers  # requests in flight on that backend when it broke (this one included)


class _RouterCollector:
    """Per-backend gauges read from the pool at scrape time."""

    def __init__(self, router: "Router"):
        self.router = router

    def collect(self):
        healthy = GaugeMetricFamily("pagedserve:router_backend_healthy", "1 if the backend receives traffic", labels=["backend"])
        inflight = GaugeMetricFamily("pagedserve:router_backend_inflight", "Requests in flight through the router", labels=["backend"])
        load = GaugeMetricFamily("pagedserve:router_backend_engine_requests",
                                 "Backend's scraped running + waiting requests (engine_load)", labels=["backend"])
        ejections = CounterMetricFamily("pagedserve:router_backend_ejections", "Passive ejections in the last minute window",
                                        labels=["backend"])
        for b in self.router.pool.all:
            healthy.add_metric([b.url], 1.0 if b.healthy else 0.0)
            inflight.add_metric([b.url], b.inflight)
            if b.running is not None:
                load.add_metric([b.url], (b.running or 0) + (b.waiting or 0))
            ejections.add_metric([b.url], b.ejections)
        n = GaugeMetricFamily("pagedserve:router_healthy_backends", "Backends receiving traffic")
        n.add_metric([], len(self.router.pool.healthy))
        yield from (healthy, inflight, load, ejections, n)


class Router(BackendUpkeep):
    """ASGI application. `await router.start()` / `stop()` (or ASGI lifespan) run the
    background loops: health checks, metrics scrapes (when the policy needs them) and the
    backends-file watcher."""

    def __init__(self, backends: list[str] | None = None, config: RouterConfig | None = None, *,
                 policy: Policy | None = None, initially_healthy: bool = True):
        self.cfg = config or RouterConfig()
        self.policy = policy or make_policy(self.cfg.policy, **({"load_factor": self.cfg.load_factor}
                                                                 if self.cfg.policy == "prefix_affinity" else {}))
        self.pool = BackendPool(eject_base_s=self.cfg.eject_base_s, failures_to_eject=self.cfg.failures_to_eject)
        for url in backends or []:
            self.pool.add(url, healthy=initially_healthy)
        self.client: httpx.AsyncClient | None = None  # control traffic: health, metrics, models
        self.upstream: upstream.UpstreamPool | None = None  # proxied requests
        self._tasks: list[asyncio.Task] = []
        self._file_urls: set[str] = set()
        self._file_mtime: float | None = None
        self._gpu = None
        self.started = False

        self.registry = CollectorRegistry(auto_describe=True)
        self.m_requests = Counter("pagedserve:router_requests", "Responses relayed, by backend and HTTP status",
                                  ["backend", "code"], registry=self.registry)
        self.m_errors = Counter("pagedserve:router_errors", "Backend failures by kind (connect, http_5xx, request_5xx, "
                                "reset, timeout, stream_broken)", ["backend", "kind"], registry=self.registry)
        self.m_retries = Counter("pagedserve:router_retries", "Requests retried elsewhere after failing on this backend",
                                 ["backend"], registry=self.registry)
        self.m_unavailable = Counter("pagedserve:router_no_backend", "Requests answered 503: no healthy backend",
                                     registry=self.registry)
        self.m_routing = Histogram("pagedserve:router_routing_latency_seconds",
                                   "Time from the request's arrival to the backend choice (body read, parse, policy)",
                                   registry=self.registry,
                                   buckets=(2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 5e-2))
        self.m_not_retried = Counter("pagedserve:router_not_retried",
                                     "Failed requests not retried elsewhere, by reason (budget, poison_suspect, "
                                     "backend_5xx)", ["reason"], registry=self.registry)
        self.registry.register(_RouterCollector(self))
        self._children: dict = {}
        self.budget = RetryBudget(self.cfg.retry_budget_ratio, self.cfg.retry_budget_min)
        self.poison = PoisonRegistry()
        self._deaths: dict[str, tuple[float, int]] = {}  # backend url -> (when it last broke, requests in flight)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self.started:
            return
        self.started = True
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=self.cfg.connect_timeout, read=self.cfg.request_timeout, write=60.0,
                                  pool=self.cfg.connect_timeout),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=1024, keepalive_expiry=4.0),
            trust_env=False,
        )
        self.upstream = upstream.UpstreamPool(connect_timeout=self.cfg.connect_timeout,
                                              read_timeout=self.cfg.request_timeout)
        if self.cfg.backends_file:
            self._read_backends_file()
        await self.check_all()  # know who is up before the first request
        self._tasks.append(asyncio.create_task(self._health_loop(), name="router-health"))
        if self.policy.needs_metrics or self.policy.needs_gpu_util:
            if self.policy.needs_gpu_util:
                self._gpu = LocalGpuUtil()
            self._tasks.append(asyncio.create_task(self._scrape_loop(), name="router-scrape"))
        if self.cfg.backends_file:
            self._tasks.append(asyncio.create_task(self._file_loop(), name="router-file"))
        log.info("router: policy %s, %d backend(s), %d healthy", self.policy.name, len(self.pool), len(self.pool.healthy))

    async def stop(self) -> None:
        await cancel_tasks(self._tasks)
        self._tasks.clear()
        if self.client is not None:
            await self.client.aclose()
            self.client = None
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
        self.started = False

    # ------------------------------------------------------------------ ASGI
    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind == "http":
            if scope["method"] == "HEAD":  # the GET answer's head, no body
                send = head_only(send)
                scope = {**scope, "method": "GET"}
            try:
                return await self._http(scope, receive, send)
            except Exception:  # noqa: BLE001 - a router bug: OpenAI-shaped 500, not uvicorn's plain text
                log.exception("router error on %s %s", scope["method"], scope["path"])
                try:
                    await self._send_error(send, 500, "internal router error; see the router log", "internal_error")
                except Exception:  # noqa: BLE001 - the response had already started
                    pass
        if kind == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    try:
                        await self.start()
                    except Exception as e:  # pragma: no cover
                        await send({"type": "lifespan.startup.failed", "message": str(e)})
                        return
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await self.stop()
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    async def _http(self, scope, receive, send):
        path = scope["path"]
        if path == "/health":
            return await self._health_endpoint(send)
        if path == "/metrics":
            return await self._send(send, 200, generate_latest(self.registry),
                                    [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")])
        if path == "/v1/models" and scope["method"] == "GET":
            return await self._models(scope, send)
        if path.startswith("/admin/") or path == "/admin":
            return await self._admin(scope, receive, send)
        return await self._proxy_guarded(scope, receive, send)

    @staticmethod
    async def _send(send, status: int, body: bytes, headers=_JSON) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": headers + [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _send_error(self, send, status: int, message: str, type_: str, extra_headers=()) -> None:
        await self._send(send, status, _error_body(message, status, type_), _JSON + list(extra_headers))

    # ------------------------------------------------------------------ proxy
    async def _proxy_guarded(self, scope, receive, send):
        """Proxy, and cancel the upstream request if the client goes away meanwhile."""
        task = asyncio.current_task()
        gone = done = False

        async def watch():
            nonlocal gone
            msg = await receive()
            while msg["type"] == "http.request" and msg.get("more_body"):
                msg = await receive()
            if msg["type"] == "http.disconnect" and not done:
                gone = True
                task.cancel()

        async def tracked_send(msg):
            nonlocal done
            if msg["type"] == "http.response.body" and not msg.get("more_body"):
                done = True
            await send(msg)

        try:
            body = await read_body(receive, declared=content_length(scope))
        except TooLarge as e:
            return await self._send_error(send, 413, str(e), "invalid_request_error")
        if body is None:
            return
        watcher = asyncio.create_task(watch())
        try:
            await self._proxy(scope, body, tracked_send)
        except asyncio.CancelledError:
            if not gone:
                raise
            if hasattr(task, "uncancel"):  # Python 3.11+
                task.uncancel()
        finally:
            watcher.cancel()

    async def _proxy(self, scope, body: bytes, send) -> None:
        t0 = time.perf_counter()
        if not self.started:
            await self.start()
        headers = [(k, v) for k, v in scope["headers"] if k not in _REQ_DROP]
        session = None
        for k, v in headers:
            if k == b"x-session-id":
                session = v.decode("latin-1")
        try:
            info = parse_request(scope["path"], body, session, self.cfg)
        except BadRequest as e:
            return await self._send_error(send, 400, str(e), "invalid_request_error")
        except Exception:  # noqa: BLE001 - routing hints only: a body we cannot read is the backend's to refuse
            info = RequestInfo(path=scope["path"], max_tokens=self.cfg.default_max_tokens, affinity_key=session)
        target = scope["raw_path"].decode("latin-1") if scope.get("raw_path") else scope["path"]
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        tried: list[Backend] = []
        failure: _Failure | None = None
        resets = 0
        self.budget.active_requests += 1
        try:
            for attempt in range(self.cfg.max_retries + 1):
                candidates = self._candidates(info, tried)
                if not candidates:
                    break
                b = self.policy.choose(info, candidates)
                if attempt == 0:
                    self.m_routing.observe(time.perf_counter() - t0)
                elif not self.budget.try_acquire():
                    self.m_not_retried.labels("budget").inc()
                    log.warning("not retrying %s: the retry budget is spent (%d retries in flight for %d requests)",
                                info.path, self.budget.active_retries, self.budget.active_requests)
                    break
                else:
                    self.m_retries.labels(tried[-1].url).inc()
                    log.info("retrying %s on %s after %s failed: %s", info.path, b.url, tried[-1].url,
                             failure.message)
                tried.append(b)
                try:
                    failure = await self._attempt(b, scope["method"], target, body, headers, info, send)
                finally:
                    if attempt:
                        self.budget.release()
                if failure is None:
                    return
                if failure.reset:
                    resets += 1
                    if not self._may_replay(failure, scope["path"], body, resets):
                        break
                elif not failure.retry:
                    break
        finally:
            self.budget.active_requests -= 1
        if failure is None:
            self.m_unavailable.inc()
            n = len(self.pool)
            await self._send_error(send, 503, f"no healthy backend: 0 of {n} backend(s) can take requests "
                                   "(starting, down or ejected); retry later", "service_unavailable",
                                   [(b"retry-after", b"1")])
        elif failure.body is not None:  # the last backend's own error answer
            await self._send(send, failure.status, failure.body, failure.headers)
        else:
            await self._send_error(send, failure.status, f"all backends tried failed; last: {failure.message}",
                                   "upstream_error")

    def _candidates(self, info: RequestInfo, tried: list[Backend]) -> list[Backend]:
        healthy = self.pool.healthy
        if tried:
            healthy = [b for b in healthy if b not in tried]
        if info.model and len(healthy) > 1:
            serving = [b for b in healthy if not b.models or info.model in b.models]
            if serving:
                return serving
        return healthy

    def _child(self, metric, *labels):
        key = (id(metric), labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def _fail(self, b: Backend, kind: str, message: str, *, connect: bool = False) -> _Failure:
        self._child(self.m_errors, b.url, kind).inc()
        self.pool.record_failure(b, message, connect=connect)
        return _Failure(f"{b.url}: {message}")

    def _reset(self, b: Backend, message: str) -> _Failure:
        """The backend's connection broke after it got the request: it died or dropped it mid-work."""
        now = time.monotonic()
        when, peers = self._deaths.get(b.url, (0.0, 0))
        if now - when > _DEATH_WINDOW_S:  # the first request to notice this death counts who was there
            peers = b.inflight
            self._deaths[b.url] = (now, peers)
        f = self._fail(b, "reset", message)
        f.reset, f.peers, f.retry, f.status = True, peers, False, 502
        return f

    def _may_replay(self, f: _Failure, path: str, body: bytes, resets: int) -> bool:
        """Whether a request whose backend broke under it may go to another backend (once, if innocent)."""
        fp = self.poison.fingerprint(path, body)
        suspect = self.poison.suspect(fp)
        self.poison.record(fp)
        if resets == 1 and f.peers > 1 and not suspect:
            return True
        self.m_not_retried.labels("poison_suspect").inc()
        why = ("it was the only request on that backend" if f.peers <= 1 else
               "the same request was at a backend failure before" if suspect else "it already broke one backend")
        log.warning("not retrying %s after %s: %s", path, f.message, why)
        f.message = (f"{f.message}; not retried on another backend because {why} (it may be what broke it)")
        return False

    async def _attempt(self, b: Backend, method: str, target: str, body: bytes, headers, info: RequestInfo,
                       send) -> _Failure | None:
        est = info.est_tokens
        b.inflight += 1
        b.inflight_tokens += est
        b.total_requests += 1
        resp = None
        try:
            try:
                resp = await self.upstream.request(b.url, method, target, headers, body)
            except upstream.ConnectError as e:
                return self._fail(b, "connect", f"connect error: {e}", connect=True)
            except upstream.ReadTimeout:
                return self._timeout(b, f"no answer within {self.cfg.request_timeout:.0f}s")
            except upstream.RemoteClosed as e:
                return self._reset(b, str(e))
            out_headers = [(k, v) for k, v in resp.headers if k not in _RESP_DROP]
            if self.cfg.backend_header:
                out_headers.append((b"x-pagedserve-backend", b.url.encode()))
            if resp.status >= 400 or not info.stream:
                return await self._relay_whole(b, resp, out_headers, info, body, send)
            return await self._relay_stream(b, resp, out_headers, send)
        finally:
            b.inflight -= 1
            b.inflight_tokens -= est
            if resp is not None:
                resp.close()

    async def _relay_whole(self, b: Backend, resp, out_headers, info: RequestInfo, body: bytes,
                           send) -> _Failure | None:
        """A JSON answer or an error: read whole, then relayed, or returned as a failure to retry or report."""
        status, timeout = resp.status, self.cfg.request_timeout
        try:
            data = await resp.aread()
        except upstream.ReadTimeout:
            return self._timeout(b, f"no answer within {timeout:.0f}s")
        except upstream.RemoteClosed as e:
            return self._reset(b, f"broken before the end of a {status} answer: {e}")
        if status in _RETRY_STATUS:
            # Only "did no work" answers are retried: 429 (queue full) and 503 with Retry-After (not
            # ready). A 5xx without it means the backend worked on this request and failed.
            retry = status == 429 or (status == 503 and any(k == b"retry-after" for k, _ in resp.headers))
            if status == 429:  # full queue: try elsewhere, the backend itself is fine
                self._child(self.m_errors, b.url, "http_429").inc()
            elif retry:  # the backend itself says it cannot serve now: counts against its health
                self._fail(b, "http_5xx", f"HTTP {status}")
            else:  # an answer to this body (one request's fault, or its engine's): not the backend's
                self._child(self.m_errors, b.url, "request_5xx").inc()
            if not retry:
                self.m_not_retried.labels("backend_5xx").inc()
                self.poison.record(self.poison.fingerprint(info.path, body))
            return _Failure(f"{b.url}: HTTP {status}", status, out_headers, data, retry=retry)
        self.pool.record_success(b)
        self._child(self.m_requests, b.url, str(status)).inc()
        await self._send(send, status, data, out_headers)
        return None

    async def _relay_stream(self, b: Backend, resp, out_headers, send) -> _Failure | None:
        """Streaming: commit to this backend only once its first bytes arrive; a break after that ends the
        stream with an error event (the client has the first bytes: no retry)."""
        status, timeout = resp.status, self.cfg.request_timeout
        try:
            first = await resp.next_chunk()
        except upstream.ReadTimeout:
            return self._timeout(b, f"no first token within {timeout:.0f}s")
        except upstream.RemoteClosed as e:
            return self._reset(b, f"closed before the first byte: {e}")
        self.pool.record_success(b)
        self._child(self.m_requests, b.url, str(status)).inc()
        await send({"type": "http.response.start", "status": status, "headers": out_headers})
        if first is not None:
            await send({"type": "http.response.body", "body": first, "more_body": True})
            tail = first
            try:
                while (chunk := await resp.next_chunk()) is not None:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    tail = chunk
            except upstream.UpstreamError as e:
                await self._end_broken_stream(b, e, tail, send)
        await send({"type": "http.response.body", "body": b""})
        return None

    async def _end_broken_stream(self, b: Backend, e: upstream.UpstreamError, tail: bytes, send) -> None:
        timeout = self.cfg.request_timeout
        msg = (f"backend {b.url} sent nothing for {timeout:.0f}s; the response is incomplete"
               if isinstance(e, upstream.ReadTimeout)
               else f"backend {b.url} failed mid-stream ({e}); the response is incomplete")
        self._child(self.m_errors, b.url, "stream_broken").inc()
        self.pool.record_failure(b, "stream broken")
        log.warning("stream from %s broke after the first bytes: %s", b.url, e)
        sep = b"" if tail.endswith(b"\n\n") else b"\n\n"
        event = b"data: " + _error_body(msg, 502, "upstream_error") + b"\n\ndata: [DONE]\n\n"
        await send({"type": "http.response.body", "body": sep + event, "more_body": True})

    def _timeout(self, b: Backend, message: str) -> _Failure:
        """No retry: the backend may still be working on it. A backend that stops answering counts
        against its health."""
        self._child(self.m_errors, b.url, "timeout").inc()
        self.pool.record_failure(b, message)
        return _Failure(f"{b.url}: {message}", 504, _JSON, _error_body(f"backend {b.url}: {message}", 504, "timeout"),
                        retry=False)

    # ------------------------------------------------------------------ router endpoints
    async def _health_endpoint(self, send) -> None:
        k, n = len(self.pool.healthy), len(self.pool)
        if k:
            body = json.dumps({"status": "ok", "healthy_backends": k, "backends": n}).encode()
            await self._send(send, 200, body)
        else:
            await self._send_error(send, 503, f"no healthy backend (0 of {n})", "service_unavailable")

    async def _models(self, scope, send) -> None:
        if not self.started:
            await self.start()
        healthy = self.pool.healthy
        if not healthy:
            self.m_unavailable.inc()
            return await self._send_error(send, 503, f"no healthy backend (0 of {len(self.pool)})",
                                          "service_unavailable", [(b"retry-after", b"1")])
        auth = [(k, v) for k, v in scope["headers"] if k == b"authorization"]

        async def one(b):
            try:
                r = await self.client.get(b.url + "/v1/models", headers=auth, timeout=self.cfg.health_timeout)
                return b, r.status_code, r.content
            except httpx.HTTPError as e:
                return b, 502, str(e).encode()

        seen: dict[str, dict] = {}
        last = (502, b"")
        for b, status, content in await asyncio.gather(*(one(b) for b in healthy)):
            if status != 200:
                last = (status, content)
                continue
            try:
                data = json.loads(content).get("data", [])
            except (ValueError, AttributeError):
                continue
            b.models = frozenset(m.get("id") for m in data if isinstance(m, dict))
            for m in data:
                if isinstance(m, dict) and m.get("id") not in seen:
                    seen[m.get("id")] = m
        if not seen and last[0] != 200:
            if last[0] in (401, 403):
                return await self._send(send, last[0], last[1])
            return await self._send_error(send, 502, "no backend answered /v1/models", "upstream_error")
        await self._send(send, 200, json.dumps({"object": "list", "data": list(seen.values())}).encode())

    async def _admin(self, scope, receive, send) -> None:
        try:
            body = await read_body(receive, 1 << 20, content_length(scope))
        except TooLarge as e:
            return await self._send_error(send, 413, str(e), "invalid_request_error")
        if body is None:
            return
        key = self.cfg.admin_api_key
        if not key:
            return await self._send_error(send, 403, "the admin API is off; start the router with --admin-api-key KEY "
                                          "(or $PAGEDSERVE_ADMIN_API_KEY) to use /admin/*", "permission_error")
        auth = dict(scope["headers"]).get(b"authorization", b"")
        if not secrets.compare_digest(auth, b"Bearer " + key.encode()):
            return await self._send_error(send, 401, "admin endpoints need 'Authorization: Bearer <admin key>'",
                                          "authentication_error", [(b"www-authenticate", b"Bearer")])
        if scope["path"].rstrip("/") != "/admin/backends":
            return await self._send_error(send, 404, f"unknown admin path {scope['path']}; use /admin/backends",
                                          "not_found_error")
        method = scope["method"]
        if method == "GET":
            out = {"policy": self.policy.name, "backends": [b.snapshot() for b in self.pool.all]}
            return await self._send(send, 200, json.dumps(out).encode())
        url = None
        try:
            url = json.loads(body).get("url") if body else None
        except (ValueError, AttributeError):
            pass
        if url is None and scope.get("query_string"):
            from urllib.parse import parse_qs

            url = (parse_qs(scope["query_string"].decode()).get("url") or [None])[0]
        if not isinstance(url, str):
            return await self._send_error(send, 400, 'give the backend as JSON {"url": "http://host:port"}',
                                          "invalid_request_error")
        try:
            url = normalize_url(url)
        except ValueError as e:
            return await self._send_error(send, 400, str(e), "invalid_request_error")
        if method == "POST":
            existed = self.pool.get(url) is not None
            b = self.add_backend(url, healthy=False)
            if self.started:
                await self._check(b)
            return await self._send(send, 200 if existed else 201, json.dumps(b.snapshot()).encode())
        if method == "DELETE":
            b = self.pool.remove(url)
            if b is None:
                return await self._send_error(send, 404, f"no backend {url}", "not_found_error")
            return await self._send(send, 200, json.dumps({"removed": url}).encode())
        return await self._send_error(send, 405, "use GET, POST or DELETE on /admin/backends", "invalid_request_error")
