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
import time
from dataclasses import asdict, dataclass, field

import httpx

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


async def send_request(client: httpx.AsyncClient, url: str, body: dict, record: RequestRecord,
                       t_origin: float, timeout: float, headers: dict | None = None) -> RequestRecord:
    """Send one streamed request and fill `record`. Never raises for a failed request:
    every failure lands in `record.error_kind` so reports count it."""
    chat = "messages" in body
    pieces: list[str] = []
    done = False
    t0 = time.perf_counter()
    record.start = t0 - t_origin
    last = t0

    async def trace(event: str, info: dict) -> None:
        if event == "http11.send_request_headers.started" and record.send_delay is None:
            record.send_delay = time.perf_counter() - t0

    try:
        async with _deadline(timeout):
            async with client.stream("POST", url, json=body, headers=headers, extensions={"trace": trace}) as resp:
                record.status = resp.status_code
                if resp.status_code != 200:
                    text = (await resp.aread()).decode("utf-8", "replace")
                    record.error_kind = f"http_{resp.status_code}"
                    record.error = text[:300]
                    return record
                buf = b""
                async for data in resp.aiter_bytes():
                    buf += data
                    if b"\n" not in data:
                        continue
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        if not line.startswith(b"data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            done = True
                            continue
                        if not payload:
                            continue
                        obj = json.loads(payload)
                        if obj.get("error"):
                            err = obj["error"]
                            raise _StreamError(err.get("message", str(err)) if isinstance(err, dict) else str(err))
                        if obj.get("usage"):
                            record.prompt_tokens = obj["usage"].get("prompt_tokens")
                            record.output_tokens = obj["usage"].get("completion_tokens")
                        choices = obj.get("choices")
                        if not choices:
                            continue
                        c0 = choices[0]
                        text = (c0.get("delta") or {}).get("content") if chat else c0.get("text")
                        if text:
                            now = time.perf_counter()
                            if record.ttft is None:
                                record.ttft = now - t0
                            else:
                                record.itl.append(now - last)
                            last = now
                            record.chunks += 1
                            pieces.append(text)
                        if c0.get("finish_reason"):
                            record.finish_reason = c0["finish_reason"]
        record.e2e = time.perf_counter() - t0
        if not done and record.finish_reason is None:
            record.error_kind, record.error = "broken_stream", "stream ended without a finish reason or [DONE]"
        elif record.ttft is None and (record.output_tokens or 0) > 0:
            record.error_kind, record.error = "broken_stream", "usage reports tokens but no text arrived"
        else:
            record.success = True
    except (TimeoutError, asyncio.TimeoutError, httpx.TimeoutException) as e:
        record.error_kind, record.error = "timeout", f"no complete answer within {timeout:g}s ({type(e).__name__})"
    except _StreamError as e:
        record.error_kind, record.error = "stream_error", str(e)[:300]
    except (httpx.RemoteProtocolError, httpx.ReadError) as e:
        # Before the status line arrived it is a connection failure; after it, a broken stream.
        record.error_kind = "broken_stream" if record.status is not None else "connection"
        record.error = f"{type(e).__name__}: {e}"[:300]
    except (httpx.ConnectError, httpx.WriteError, httpx.NetworkError) as e:
        record.error_kind, record.error = "connection", f"{type(e).__name__}: {e}"[:300]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        record.error_kind, record.error = "broken_stream", f"malformed SSE data: {e}"[:300]
    except Exception as e:  # noqa: BLE001 — a load test must count, not crash on, surprises
        record.error_kind, record.error = "other", f"{type(e).__name__}: {e}"[:300]
    finally:
        record.generated_text = "".join(pieces)
        if record.e2e is None and not record.success:
            record.e2e = time.perf_counter() - t0
    if record.output_tokens is not None:
        record.token_source = "usage"
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


class ClientPool:
    """Several httpx clients, each owning at most `per_client` connections.

    httpcore's connection pool scans every connection on each request and
    response close, which is quadratic in the number of streams: one client with
    600 open streams burns a whole core on bookkeeping. Sharding keeps each pool
    small; stream `i` always uses client `i % n` (so a closed-loop worker keeps
    its keep-alive connection).
    """

    def __init__(self, streams: int, timeout: float, api_key: str | None = None, per_client: int = 16):
        import ssl

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        n = max(1, -(-streams // per_client))
        ctx = ssl.create_default_context()  # one SSL context for all shards (creating one costs ms)
        self.clients = [
            httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=per_client),
                              timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)),
                              headers=headers, trust_env=False, verify=ctx)
            for _ in range(n)
        ]

    def get(self, i: int) -> httpx.AsyncClient:
        return self.clients[i % len(self.clients)]

    async def aclose(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self.clients))
