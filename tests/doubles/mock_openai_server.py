"""A tiny OpenAI-compatible streaming server with exactly known timing, for testing load generators.

It does no model work: each request waits `ttft` seconds, then streams
`max_tokens` tokens in chunks of `tokens_per_chunk` tokens, one chunk every
`itl` seconds (deadlines are absolute, so sleep jitter does not accumulate).
The truth a client should report is therefore

    TTFT = ttft,  ITL = itl,  E2E = ttft + (ceil(n / k) - 1) * itl,
    TPOT = (E2E - TTFT) / (n - 1),  usage.completion_tokens = n,

where n = max_tokens and k = tokens_per_chunk. Each token's text is " the"
(one token in GPT-2-style tokenizers) so a tokenizer fallback can count it;
`usage.prompt_tokens` is the number of whitespace-separated words of the prompt.

GET /mock/timings returns, per prompt, when each chunk really left (seconds
after the request arrived), for tests on a busy machine; `arrived_at`, `first_at`
and `last_at` are the same instants on the machine's monotonic clock
(time.perf_counter on Linux), so a client on the same machine can compare its own
send times with them (a burst queued before the server reads it is part of TTFT).

Markers in the prompt (or the last chat message) trigger failures:
`[[http500]]`, `[[http429]]` answer with that status; `[[hang]]` never answers;
`[[stall]]` sends one chunk and then hangs; `[[break]]` sends one chunk and
then closes the connection mid-stream; `[[nodone]]` ends the stream cleanly but
without a finish reason or `data: [DONE]`.

Pure asyncio and the standard library (no FastAPI), so thousands of streams
cost little CPU and the file runs without importing pagedserve:

    python tests/doubles/mock_openai_server.py --port 0 --ttft 0.2 --itl 0.02
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import sys
import time

_MARKER = re.compile(rb"\[\[(http\d{3}|hang|stall|break|nodone)\]\]")


class MockServer:
    def __init__(self, ttft: float = 0.1, itl: float = 0.02, tokens_per_chunk: int = 1,
                 send_usage: bool = True, model: str = "mock", loading_requests: int = 0):
        self.ttft, self.itl, self.k = ttft, itl, max(1, tokens_per_chunk)
        self.loading_requests = loading_requests  # answer this many generation requests 503 "loading" first
        self.rejected = 0
        self.send_usage, self.model = send_usage, model
        self.active = 0
        self.max_active = 0
        self.requests = 0
        # What the server really did, per prompt (seconds after the request arrived): the truth
        # tests compare against, since a starved CPU can make sleeps overshoot the nominal timing.
        self.timings: dict[str, dict] = {}
        # Cumulative (sum, count) of completed requests, served as vLLM-named histograms on /metrics.
        self.hist = {"time_to_first_token_seconds": (0.0, 0), "e2e_request_latency_seconds": (0.0, 0)}
        self._server: asyncio.base_events.Server | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._handle, host, port, backlog=4096)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server:
            self._server.close()

    # -- HTTP/1.1 with keep-alive -------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                keep = await self._route(method, path.split("?")[0], body, writer)
                if not keep:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _plain(writer, status: int, obj) -> None:
        data = json.dumps(obj).encode()
        writer.write(f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
                     f"content-length: {len(data)}\r\n\r\n".encode() + data)

    async def _route(self, method: str, path: str, body: bytes, writer) -> bool:
        if method == "GET" and path in ("/health", "/v1/health"):
            self._plain(writer, 200, {"status": "ok"})
        elif method == "GET" and path == "/metrics":
            self._metrics(writer)
        elif method == "GET" and path == "/mock/timings":
            self._plain(writer, 200, self.timings)
        elif method == "GET" and path == "/v1/models":
            self._plain(writer, 200, {"object": "list", "data": [{"id": self.model, "object": "model"}]})
        elif method == "POST" and path in ("/v1/completions", "/v1/chat/completions") and self.loading_requests:
            self.loading_requests -= 1
            self.rejected += 1
            self._plain(writer, 503, {"error": {"message": "the model is still loading", "type": "not_ready"}})
        elif method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            self.requests += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            try:
                return await self._generate(path.endswith("chat/completions"), body, writer)
            finally:
                self.active -= 1
        else:
            self._plain(writer, 404, {"error": {"message": f"no route {method} {path}"}})
        await writer.drain()
        return True

    def _metrics(self, writer) -> None:
        """vLLM-named latency histograms (sum and count only), from the real chunk times."""
        lines = []
        for name, (total, count) in self.hist.items():
            lines += [f'vllm:{name}_sum{{model_name="{self.model}"}} {total}',
                      f'vllm:{name}_count{{model_name="{self.model}"}} {count}']
        data = ("\n".join(lines) + "\n").encode()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s" % (len(data), data))

    async def _generate(self, chat: bool, body: bytes, writer) -> bool:
        t0 = time.perf_counter()
        req = json.loads(body)
        if chat:
            prompt = str((req.get("messages") or [{}])[-1].get("content", ""))
        else:
            prompt = req.get("prompt", "")
            prompt = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
        m = _MARKER.search(prompt.encode())
        marker = m.group(1).decode() if m else ""
        if marker.startswith("http"):
            self._plain(writer, int(marker[4:]), {"error": {"message": f"mock {marker}", "type": "mock"}})
            await writer.drain()
            return True
        if marker == "hang":
            await asyncio.sleep(1e6)
        n = int(req.get("max_tokens") or req.get("max_completion_tokens") or 16)
        stream = bool(req.get("stream"))
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": n,
                 "total_tokens": len(prompt.split()) + n}
        want_usage = self.send_usage and bool((req.get("stream_options") or {}).get("include_usage"))
        rid, created = f"mock-{self.requests}", int(time.time())
        obj_name = "chat.completion.chunk" if chat else "text_completion"

        rendered: dict[tuple, bytes] = {}  # a stream repeats the same few chunks: JSON-encode each once

        def chunk(text: str | None, finish: str | None = None, with_usage: bool = False) -> bytes:
            key = (text, finish, with_usage)
            if key not in rendered:
                rendered[key] = render(text, finish, with_usage)
            return rendered[key]

        def render(text: str | None, finish: str | None, with_usage: bool) -> bytes:
            if text is None:
                choices = []
            elif chat:
                delta = {"role": "assistant", "content": ""} if text == "" else {"content": text}
                choices = [{"index": 0, "delta": delta, "finish_reason": finish}]
            else:
                choices = [{"index": 0, "text": text, "finish_reason": finish}]
            obj = {"id": rid, "object": obj_name, "created": created, "model": self.model, "choices": choices}
            if with_usage:
                obj["usage"] = usage
            data = b"data: " + json.dumps(obj).encode() + b"\n\n"
            return b"%x\r\n%s\r\n" % (len(data), data)

        if stream:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            if chat:  # role-only first chunk, sent at once as OpenAI does: it carries no token
                writer.write(chunk(""))
            await writer.drain()
        await asyncio.sleep(max(0.0, t0 + self.ttft - time.perf_counter()))
        if not stream:
            text = " the" * n
            key = "message" if chat else "text"
            val = {"role": "assistant", "content": text} if chat else text
            self._plain(writer, 200, {"id": rid, "object": obj_name, "model": self.model, "usage": usage,
                                      "choices": [{"index": 0, key: val, "finish_reason": "length"}]})
            await writer.drain()
            return True
        n_chunks = math.ceil(n / self.k)
        for i in range(n_chunks):
            if i:
                await asyncio.sleep(max(0.0, t0 + self.ttft + i * self.itl - time.perf_counter()))
            toks = min(self.k, n - i * self.k)
            last = i == n_chunks - 1
            if last and marker == "nodone":
                writer.write(chunk(" the" * toks) + b"0\r\n\r\n")
                await writer.drain()
                return True
            now = time.perf_counter()  # stamped as the bytes are handed over: a client cannot read them sooner
            sent = now - t0
            writer.write(chunk(" the" * toks, "length" if last else None))
            await writer.drain()
            if i == 0:
                tm = self.timings[prompt] = {"first": sent, "chunks": [], "arrived_at": t0, "first_at": now}
            tm["chunks"].append(sent)
            tm["last"] = sent
            tm["last_at"] = now
            if marker == "break":
                writer.transport.abort()
                return False
            if marker == "stall":
                await asyncio.sleep(1e6)
        for name, v in (("time_to_first_token_seconds", tm["first"]), ("e2e_request_latency_seconds", tm["last"])):
            total, count = self.hist[name]
            self.hist[name] = (total + v, count + 1)
        if want_usage:
            writer.write(chunk(None, with_usage=True))
        done = b"data: [DONE]\n\n"
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
        await writer.drain()
        return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--ttft", type=float, default=0.1, help="seconds before the first token")
    p.add_argument("--itl", type=float, default=0.02, help="seconds between chunks")
    p.add_argument("--tokens-per-chunk", type=int, default=1)
    p.add_argument("--no-usage", action="store_true", help="never send usage, even when asked")
    p.add_argument("--model", default="mock")
    p.add_argument("--loading-requests", type=int, default=0,
                   help="answer the first N generation requests 503 'still loading'")
    p.add_argument("--processes", type=int, default=1,
                   help="serve from N processes on one port (SO_REUSEPORT), so the mock outruns a fast client")
    p.add_argument("--timings-dir", default=None,
                   help="on SIGTERM each process writes its /mock/timings to DIR/<pid>.json (several processes)")
    a = p.parse_args(argv)
    import os
    import signal
    import socket

    sock = socket.socket()
    if a.processes > 1:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((a.host, a.port))
    port = sock.getsockname()[1]
    children = []
    for _ in range(a.processes - 1):
        pid = os.fork()
        if pid == 0:  # a child: its own socket on the same port; the kernel spreads connections
            sock.close()
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((a.host, port))
            children = None
            break
        children.append(pid)
    srv = MockServer(a.ttft, a.itl, a.tokens_per_chunk, not a.no_usage, a.model, a.loading_requests)

    def stop(*_) -> None:
        for pid in children or ():
            os.kill(pid, signal.SIGTERM)
        for pid in children or ():
            os.waitpid(pid, 0)
        if a.timings_dir:
            with open(os.path.join(a.timings_dir, f"{os.getpid()}.json"), "w") as f:
                json.dump(srv.timings, f)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)

    async def serve() -> None:
        sock.listen(4096)
        srv._server = await asyncio.start_server(srv._handle, sock=sock)
        if children is not None:
            print(f"READY {port}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
