"""One streamed OpenAI request, timed: the unit of work of `pagedserve bench serve`.

Timing follows `vllm bench serve`: TTFT is send -> first chunk that carries
text; ITL is the gap between consecutive text-carrying chunks; E2E is send ->
end of stream. Token counts come from the `usage` chunk that
`stream_options.include_usage` asks for; when a server sends none, the caller
counts the generated text with a tokenizer. Chunks are never counted as tokens
(a chunk may carry several tokens, or none).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

from pagedserve.cluster import upstream

# Error kinds, in the order reports list them.
ERROR_KINDS = ("timeout", "http", "broken_stream", "stream_error", "connection", "other")


@dataclass
class BenchRequest:
    """One prompt of a workload: `prompt_len` is the tokenizer's count (-1 if unknown)."""

    prompt: str
    prompt_len: int
    output_len: int
    messages: list[dict] | None = None  # chat endpoint: sent as is instead of one user turn


@dataclass
class RequestRecord:
    """Everything measured about one request; times are seconds, `start` is relative to the run."""

    index: int
    start: float = 0.0
    scheduled: float | None = None  # rate mode: when the arrival process wanted it sent
    success: bool = False
    error_kind: str | None = None  # timeout | http_<status> | broken_stream | stream_error | connection | other
    error: str | None = None
    status: int | None = None
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    token_source: str | None = None  # "usage" | "tokenizer"
    expected_prompt_len: int = -1
    max_tokens: int = 0
    send_delay: float | None = None  # client-side: start -> request headers written (connect, pool, CPU)
    chunks: int = 0  # text-carrying chunks (for information only; never used as a token count)
    finish_reason: str | None = None
    generated_text: str = ""

    @property
    def tpot(self) -> float | None:
        """(E2E - TTFT) / (output_tokens - 1), vLLM's definition; None with fewer than 2 tokens."""
        if not self.success or self.ttft is None or self.e2e is None or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def to_dict(self, with_text: bool = False) -> dict:
        d = asdict(self)
        d["tpot"] = self.tpot
        if not with_text:
            d.pop("generated_text")
        return d


def endpoint_url(url: str, endpoint: str) -> str:
    """`http://h:p`, `http://h:p/v1` or a full `.../completions` URL -> the endpoint's URL."""
    url = url.rstrip("/")
    if url.endswith("/completions"):
        return url
    if not url.endswith("/v1"):
        url += "/v1"
    return url + ("/chat/completions" if endpoint == "chat" else "/completions")


def build_body(req: BenchRequest, model: str, endpoint: str, ignore_eos: bool, temperature: float,
               extra: dict | None = None) -> dict:
    body: dict = {"model": model, "max_tokens": req.output_len, "stream": True,
                  "stream_options": {"include_usage": True}, "temperature": temperature}
    if endpoint == "chat":
        body["messages"] = req.messages or [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM's extension; our server accepts it too
    if extra:
        body.update(extra)
    return body


# The per-chunk fast path. A chunk is parsed with json.loads only when it carries `usage`
# or `error` (once per stream); otherwise two byte-level regex probes tell whether it carries
# text and a finish reason. Unescaped `"key"` sequences can only be JSON structure (a quote
# inside a string value is escaped), so the probes are exact for one-choice OpenAI chunks;
# the finish reason is read from the last event that has choices, once the stream ended;
# `"text"` / `"content"` must be followed by a non-empty string (the chat role chunk's
# `"content":""`, `"content":null` and chat logprobs' `"content":[...]` carry no text).
# benchmarks/bench_client_hotpath.py measures it: see the README's "Load testing".
_TEXT = {False: re.compile(rb'"text"\s*:\s*"(?!")'), True: re.compile(rb'"content"\s*:\s*"(?!")')}
_FINISH = re.compile(rb'"finish_reason"\s*:\s*"([^"]+)"')
_FULL = re.compile(rb'"(?:usage|error)"\s*:\s*[^n\s]')  # present and not null


def _text_of(payload: bytes, chat: bool) -> str:
    """The text of a text-carrying chunk (decoded only when the text is needed)."""
    c0 = (json.loads(payload).get("choices") or [{}])[0]
    return ((c0.get("delta") or {}).get("content") if chat else c0.get("text")) or ""


async def send_request(pool: "StreamPool", url: str, body: dict, record: RequestRecord,
                       t_origin: float, timeout: float, keep_text: bool = False) -> RequestRecord:
    """Send one streamed request and fill `record`. Never raises for a failed request:
    every failure lands in `record.error_kind` so reports count it. The generated text is
    decoded only when `keep_text` is set or the server sent no usage (tokenizer fallback)."""
    chat = "messages" in body
    has_text, needs_json = _TEXT[chat].search, _FULL.search
    clock = time.perf_counter_ns
    stamps: list[int] = []  # perf_counter_ns of each text-carrying chunk
    texts: list[bytes] = []  # their payloads, decoded at the end only if the text is needed
    done = False
    last = b""  # the last event with choices: its finish_reason is read once, at the end
    resp = None
    t0 = clock()
    record.start = t0 / 1e9 - t_origin
    try:
        async with _deadline(timeout):
            resp = await pool.post(url, json.dumps(body).encode())
            record.send_delay = max(0.0, resp.sent_at - t0 / 1e9)
            record.status = resp.status
            if resp.status != 200:
                text = (await resp.aread()).decode("utf-8", "replace")
                record.error_kind = f"http_{resp.status}"
                record.error = text[:300]
                return record
            buf = b""
            while (data := await resp.next_chunk()) is not None:
                if buf:
                    data = buf + data
                if b"\n" not in data:
                    buf = data
                    continue
                *lines, buf = data.split(b"\n")
                now = clock()
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        done = True
                        continue
                    if not payload:
                        continue
                    if needs_json(payload):
                        obj = json.loads(payload)
                        if obj.get("error"):
                            err = obj["error"]
                            raise _StreamError(err.get("message", str(err)) if isinstance(err, dict) else str(err))
                        if obj.get("usage"):
                            record.prompt_tokens = obj["usage"].get("prompt_tokens")
                            record.output_tokens = obj["usage"].get("completion_tokens")
                        if not obj.get("choices"):
                            continue
                    if has_text(payload):
                        stamps.append(now)
                        texts.append(payload)
                    last = payload
        record.e2e = (clock() - t0) / 1e9
        if m := _FINISH.search(last):
            record.finish_reason = m.group(1).decode()
        if not done and record.finish_reason is None:
            record.error_kind, record.error = "broken_stream", "stream ended without a finish reason or [DONE]"
        elif not stamps and (record.output_tokens or 0) > 0:
            record.error_kind, record.error = "broken_stream", "usage reports tokens but no text arrived"
        else:
            record.success = True
    except (TimeoutError, asyncio.TimeoutError, upstream.ReadTimeout) as e:
        record.error_kind, record.error = "timeout", f"no complete answer within {timeout:g}s ({type(e).__name__})"
    except _StreamError as e:
        record.error_kind, record.error = "stream_error", str(e)[:300]
    except upstream.RemoteClosed as e:
        # Before the status line arrived it is a connection failure; after it, a broken stream.
        record.error_kind = "broken_stream" if record.status is not None else "connection"
        record.error = f"{type(e).__name__}: {e}"[:300]
    except (upstream.ConnectError, OSError) as e:
        record.error_kind, record.error = "connection", f"{type(e).__name__}: {e}"[:300]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        record.error_kind, record.error = "broken_stream", f"malformed SSE data: {e}"[:300]
    except Exception as e:  # noqa: BLE001 — a load test must count, not crash on, surprises
        record.error_kind, record.error = "other", f"{type(e).__name__}: {e}"[:300]
    finally:
        if resp is not None:
            resp.close()
        if stamps:
            record.ttft = (stamps[0] - t0) / 1e9
            record.itl = [(b - a) / 1e9 for a, b in zip(stamps, stamps[1:])]
            record.chunks = len(stamps)
        if record.e2e is None and not record.success:
            record.e2e = (clock() - t0) / 1e9
    if record.output_tokens is not None:
        record.token_source = "usage"
    if texts and (keep_text or (record.success and record.output_tokens is None)):
        try:
            record.generated_text = "".join(_text_of(p, chat) for p in texts)
        except (ValueError, IndexError, AttributeError) as e:
            record.success, record.error_kind, record.error = False, "broken_stream", f"malformed SSE data: {e}"[:300]
    return record


class _StreamError(Exception):
    pass


@contextlib.asynccontextmanager
async def _fallback_deadline(seconds: float):
    """asyncio.timeout for Python 3.10: cancel the task when the deadline passes, raise TimeoutError."""
    task, fired = asyncio.current_task(), []

    def expire() -> None:
        fired.append(True)
        task.cancel()

    handle = asyncio.get_running_loop().call_later(seconds, expire)
    try:
        yield
    except asyncio.CancelledError:
        if not fired:  # cancelled by someone else
            raise
        raise TimeoutError from None
    finally:
        handle.cancel()


_deadline = getattr(asyncio, "timeout", _fallback_deadline)  # asyncio.timeout is Python 3.11+


class StreamPool:
    """Keep-alive connections for the load generator: the router's lean httptools client
    (pagedserve/cluster/upstream.py), which costs tens of microseconds per request where
    httpx costs about half a millisecond plus its per-chunk async-generator layers
    (measured in benchmarks/bench_client_hotpath.py). Any idle connection serves any stream."""

    def __init__(self, streams: int, timeout: float, api_key: str | None = None):
        self.pool = upstream.UpstreamPool(connect_timeout=min(timeout, 30.0), read_timeout=None,
                                          idle_timeout=60.0, max_idle_per_backend=max(64, streams))
        self.headers = [(b"content-type", b"application/json"), (b"accept", b"text/event-stream")]
        if api_key:
            self.headers.append((b"authorization", f"Bearer {api_key}".encode("latin-1")))
        self._split: dict[str, tuple[str, str]] = {}

    def _base_target(self, url: str) -> tuple[str, str]:
        bt = self._split.get(url)
        if bt is None:
            u = urlsplit(url)
            bt = self._split[url] = (f"{u.scheme}://{u.netloc}", (u.path or "/") + (f"?{u.query}" if u.query else ""))
        return bt

    async def post(self, url: str, body: bytes) -> upstream.Response:
        base, target = self._base_target(url)
        return await self.pool.request(base, "POST", target, self.headers, body)

    async def get(self, url: str, timeout: float = 10.0) -> tuple[int, bytes]:
        """A small GET (control traffic: /v1/models, /metrics); (status, body)."""
        base, target = self._base_target(url)
        resp = None
        try:
            async with _deadline(timeout):
                resp = await self.pool.request(base, "GET", target, self.headers[2:], b"")
                return resp.status, await resp.aread()
        finally:
            if resp is not None:
                resp.close()

    async def aclose(self) -> None:
        self.pool.close()
