"""A simulated continuous-batching GPU backend speaking the OpenAI API (tests, benchmarks).

It models what makes routing matter, with time scaled down (default: 1 ms per decode step):
- continuous batching: every running sequence gets one token per step; a step takes
  `token_time * (1 + batch_slowdown * (batch - 1))`, plus `prefill_time_per_token` for each
  uncached prompt token of sequences admitted in that step;
- a bounded batch (`max_num_seqs`) and a FIFO queue behind it (TTFT grows with the queue);
- a prefix cache (LRU of hashed blocks of prompt "tokens", i.e. words) that skips prefill;
- vLLM-named /metrics (`vllm:num_requests_running`, `vllm:num_requests_waiting`,
  `vllm:kv_cache_usage_perc`, `vllm:prefix_cache_queries_total`, `vllm:prefix_cache_hits_total`)
  and a GPU-utilization reading (`DCGM_FI_DEV_GPU_UTIL`): the busy fraction of the last
  `util_window` seconds, which saturates at 100% as soon as any batch runs, as nvidia-smi does.

Generation is exactly `max_tokens` tokens (like `ignore_eos`), streamed as a first chunk at
the first token and then every `chunk_tokens` tokens. The loop keeps a virtual clock and
sleeps only until the next event (a chunk, a finish, an arrival that fits), so it costs a few
wake-ups per request rather than one per step.

Fault knobs for tests (attributes): `fail_status` (answer generation requests with this
status), `health_status`, `drop_before_first_chunk` (send headers then drop the connection),
`break_after_chunks` (drop the connection after N chunks), `fail_retry_after` (send
Retry-After with `fail_status`).

`python -m tests.doubles.sim_backends --num 4` serves several on consecutive free ports and
prints their URLs as JSON on one line.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import math
import sys
import time
from dataclasses import asdict, dataclass


@dataclass
class SimConfig:
    max_num_seqs: int = 8
    token_time: float = 0.001  # s per decode step with a batch of one
    batch_slowdown: float = 0.15  # each extra running sequence adds this fraction to a step
    prefill_time_per_token: float = 2e-5  # s per uncached prompt token, added to the admitting step
    kv_capacity_tokens: int = 1 << 20
    prefix_cache_blocks: int = 0  # LRU capacity in blocks (0: no prefix cache)
    block_size: int = 16
    chunk_tokens: int = 50
    util_window: float = 0.25  # s, like nvidia-smi's sample period (scaled down with time)
    model: str = "sim"


class _Req:
    __slots__ = ("words", "n_prompt", "max_tokens", "generated", "queue", "cached", "new", "aborted", "id")
    _ids = itertools.count()

    def __init__(self, words: list[str], max_tokens: int):
        self.words = words
        self.n_prompt = max(1, len(words))
        self.max_tokens = max(1, max_tokens)
        self.generated = 0
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cached = 0
        self.new = True
        self.aborted = False
        self.id = next(self._ids)


class SimBackend:
    """ASGI app + engine loop. Start the loop lazily on the first request (or lifespan)."""

    def __init__(self, config: SimConfig | None = None, name: str = "sim"):
        self.cfg = config or SimConfig()
        self.name = name
        self.waiting: collections.deque[_Req] = collections.deque()
        self.running: list[_Req] = []
        self.kv_used = 0  # reserved tokens (prompt + max_tokens) of running sequences
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.requests_seen = 0
        self.finished = 0
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._busy: collections.deque = collections.deque()  # (start, end) of busy periods
        self._busy_start: float | None = None
        # fault knobs
        self.fail_status: int | None = None
        self.fail_retry_after = False  # send Retry-After with fail_status ("not ready": safe to retry)
        self.health_status = 200
        self.drop_before_first_chunk = False
        self.break_after_chunks: int | None = None

    # ------------------------------------------------------------------ engine
    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    def _admit(self) -> int:
        cfg = self.cfg
        prefill = 0
        while self.waiting and len(self.running) < cfg.max_num_seqs:
            r = self.waiting[0]
            if r.aborted:
                self.waiting.popleft()
                continue
            need = r.n_prompt + r.max_tokens
            if self.running and self.kv_used + need > cfg.kv_capacity_tokens:
                break
            self.waiting.popleft()
            self.kv_used += need
            r.cached = self._lookup_prefix(r) if cfg.prefix_cache_blocks else 0
            prefill += r.n_prompt - r.cached
            self.running.append(r)
        return prefill

    def _lookup_prefix(self, r: _Req) -> int:
        bs = self.cfg.block_size
        h = 0
        hits = 0
        still = True
        for i in range(len(r.words) // bs):
            h = hash((h, tuple(r.words[i * bs:(i + 1) * bs])))
            if still and h in self._cache:
                self._cache.move_to_end(h)
                hits += 1
            else:
                still = False
                self._cache[h] = None
                if len(self._cache) > self.cfg.prefix_cache_blocks:
                    self._cache.popitem(last=False)
        cached = min(hits * bs, r.n_prompt - 1)
        self.prefix_queries += r.n_prompt
        self.prefix_hits += cached
        return cached

    def _step_time(self, prefill_tokens: int) -> float:
        c = self.cfg
        return c.token_time * (1.0 + c.batch_slowdown * (len(self.running) - 1)) + c.prefill_time_per_token * prefill_tokens

    def _steps_to_event(self) -> int:
        ch = self.cfg.chunk_tokens
        k = math.inf
        for r in self.running:
            if r.new:
                return 1
            nxt = min(r.max_tokens, (r.generated // ch + 1) * ch) - r.generated
            k = min(k, nxt)
        return max(1, int(k))

    async def _run(self) -> None:
        clock = time.monotonic
        t = clock()
        while True:
            prefill = self._admit()
            if not self.running:
                if self._busy_start is not None:
                    self._busy.append((self._busy_start, t))
                    self._busy_start = None
                self._wake.clear()
                await self._wake.wait()
                t = max(t, clock())
                continue
            if self._busy_start is None:
                self._busy_start = t
            step = self._step_time(prefill)
            k = self._steps_to_event()
            room = len(self.running) < self.cfg.max_num_seqs
            delay = t + k * step - clock()
            if delay > 0:
                if room:  # an arrival may join at the next step boundary
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), delay)
                        k = max(1, min(k, math.ceil((clock() - t) / step)))
                        delay = t + k * step - clock()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    except asyncio.TimeoutError:
                        pass
                else:
                    await asyncio.sleep(delay)
            elif delay < -0.05:  # far behind real time (CPU starved): yield now and then
                await asyncio.sleep(0)
            t += k * step
            self._advance(k)

    def _advance(self, k: int) -> None:
        ch = self.cfg.chunk_tokens
        still = []
        for r in self.running:
            before = r.generated
            r.generated = min(r.max_tokens, r.generated + k)
            r.new = False
            if r.aborted:
                self.kv_used -= r.n_prompt + r.max_tokens
                continue
            done = r.generated >= r.max_tokens
            if before == 0 or done or r.generated // ch > before // ch:
                r.queue.put_nowait((r.generated - before, done))
            if done:
                self.kv_used -= r.n_prompt + r.max_tokens
                self.finished += 1
            else:
                still.append(r)
        self.running = still

    def submit(self, words: list[str], max_tokens: int) -> _Req:
        self._ensure_loop()
        r = _Req(words, max_tokens)
        self.waiting.append(r)
        self.requests_seen += 1
        self._wake.set()
        return r

    # ------------------------------------------------------------------ metrics
    def gpu_util(self) -> float:
        now = time.monotonic()
        lo = now - self.cfg.util_window
        while self._busy and self._busy[0][1] < lo:
            self._busy.popleft()
        busy = sum(min(e, now) - max(s, lo) for s, e in self._busy if e > lo)
        if self._busy_start is not None:
            busy += now - max(self._busy_start, lo)
        return max(0.0, min(100.0, 100.0 * busy / self.cfg.util_window))

    def metrics_text(self) -> str:
        m = f'model_name="{self.cfg.model}"'
        kv = min(1.0, sum(r.n_prompt + r.generated for r in self.running) / self.cfg.kv_capacity_tokens)
        return (
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{{{m}}} {len(self.running)}\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{{{m}}} {len(self.waiting)}\n"
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            f"vllm:kv_cache_usage_perc{{{m}}} {kv}\n"
            "# TYPE vllm:prefix_cache_queries counter\n"
            f"vllm:prefix_cache_queries_total{{{m}}} {self.prefix_queries}\n"
            "# TYPE vllm:prefix_cache_hits counter\n"
            f"vllm:prefix_cache_hits_total{{{m}}} {self.prefix_hits}\n"
            "# TYPE vllm:request_success counter\n"
            f"vllm:request_success_total{{{m}}} {self.finished}\n"
            "# TYPE DCGM_FI_DEV_GPU_UTIL gauge\n"
            f'DCGM_FI_DEV_GPU_UTIL{{gpu="0"}} {self.gpu_util():.1f}\n'
        )

    def stats(self) -> dict:
        return {"name": self.name, "requests": self.requests_seen, "finished": self.finished,
                "prefix_queries": self.prefix_queries, "prefix_hits": self.prefix_hits,
                "running": len(self.running), "waiting": len(self.waiting)}

    # ------------------------------------------------------------------ HTTP
    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    self._ensure_loop()
                    await send({"type": "lifespan.startup.complete"})
                else:
                    if self._loop_task:
                        self._loop_task.cancel()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == "/health":
            return await _send(send, self.health_status, b"{}" if self.health_status == 200 else b'{"error": "down"}')
        if path == "/metrics":
            return await _send(send, 200, self.metrics_text().encode(), b"text/plain; version=0.0.4")
        if path == "/v1/models":
            body = {"object": "list", "data": [{"id": self.cfg.model, "object": "model", "owned_by": "sim"}]}
            return await _send(send, 200, json.dumps(body).encode())
        if path == "/sim/stats":
            return await _send(send, 200, json.dumps(self.stats()).encode())
        if path == "/sim/reset" and method == "POST":  # empty prefix cache, zero counters
            self._cache.clear()
            self.prefix_queries = self.prefix_hits = self.requests_seen = self.finished = 0
            return await _send(send, 200, b"{}")
        if method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            return await self._generate(scope, receive, send, chat=path.endswith("chat/completions"))
        return await _send(send, 404, b'{"error": {"message": "not found", "type": "not_found_error", "code": 404}}')

    async def _generate(self, scope, receive, send, chat: bool):
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        if self.fail_status is not None:
            err = {"error": {"message": f"{self.name}: injected failure", "type": "internal_error", "code": self.fail_status}}
            return await _send(send, self.fail_status, json.dumps(err).encode(),
                               extra=[(b"retry-after", b"1")] if self.fail_retry_after else [])
        try:
            data = json.loads(body)
        except ValueError:
            return await _send(send, 400, b'{"error": {"message": "bad JSON", "type": "invalid_request_error", "code": 400}}')
        if chat:
            text = " ".join(str(m.get("content", "")) for m in data.get("messages", []))
        else:
            p = data.get("prompt", "")
            text = p if isinstance(p, str) else " ".join(map(str, p))
        words = text.split()
        max_tokens = int(data.get("max_tokens") or data.get("max_completion_tokens") or 16)
        stream = data.get("stream") is True
        r = self.submit(words, max_tokens)

        async def watch_disconnect():  # a real server aborts the request when its client leaves
            while (await receive())["type"] != "http.disconnect":
                pass
            if r.generated < r.max_tokens:
                r.aborted = True
                r.queue.put_nowait((0, None))

        watcher = asyncio.create_task(watch_disconnect())
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{self.name}-{r.id}"
        obj = "chat.completion" if chat else "text_completion"
        usage = {"prompt_tokens": r.n_prompt, "completion_tokens": max_tokens, "total_tokens": r.n_prompt + max_tokens}
        try:
            if not stream:
                while True:
                    _, done = await r.queue.get()
                    if done is None:
                        return
                    if done:
                        break
                text_out = " x" * max_tokens
                choice = ({"index": 0, "message": {"role": "assistant", "content": text_out}, "finish_reason": "length"}
                          if chat else {"index": 0, "text": text_out, "finish_reason": "length", "logprobs": None})
                out = {"id": rid, "object": obj, "created": int(time.time()), "model": self.cfg.model,
                       "choices": [choice], "usage": usage, "backend": self.name}
                return await _send(send, 200, json.dumps(out).encode())
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
            if self.drop_before_first_chunk:
                raise ConnectionAbortedError("injected: dropped before the first chunk")
            sent = 0
            include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
            while True:
                n, done = await r.queue.get()
                if done is None:
                    return
                piece = " x" * n
                if chat:
                    choice = {"index": 0, "delta": {"content": piece} if sent else {"role": "assistant", "content": piece},
                              "finish_reason": "length" if done else None}
                else:
                    choice = {"index": 0, "text": piece, "finish_reason": "length" if done else None, "logprobs": None}
                ev = {"id": rid, "object": obj + ".chunk" if chat else obj, "created": int(time.time()),
                      "model": self.cfg.model, "choices": [choice]}
                payload = b"data: " + json.dumps(ev).encode() + b"\n\n"
                if done:
                    if include_usage:
                        u = {"id": rid, "object": ev["object"], "created": ev["created"], "model": self.cfg.model,
                             "choices": [], "usage": usage}
                        payload += b"data: " + json.dumps(u).encode() + b"\n\n"
                    payload += b"data: [DONE]\n\n"
                await send({"type": "http.response.body", "body": payload, "more_body": not done})
                sent += 1
                if done:
                    return
                if self.break_after_chunks is not None and sent >= self.break_after_chunks:
                    raise ConnectionAbortedError("injected: stream broken")
        finally:
            watcher.cancel()
            if r.generated < r.max_tokens:
                r.aborted = True


async def _send(send, status: int, body: bytes, ctype: bytes = b"application/json", extra=()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode()), *extra]})
    await send({"type": "http.response.body", "body": body})


async def serve_sims(num: int, config: SimConfig, host: str = "127.0.0.1", log_level: str = "warning",
                     port: int = 0):
    """Start `num` simulated backends in this loop (on port, port+1, ... or free ports when port
    is 0); returns [(backend, server, task, url)]."""
    from pagedserve.cluster.uvicorn_server import start_server

    out = []
    for i in range(num):
        sim = SimBackend(config, name=f"sim{i}")
        server, task, port_i = await start_server(sim, host, port + i if port else 0, log_level=log_level)
        out.append((sim, server, task, f"http://{host}:{port_i}"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.doubles.sim_backends", description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=4)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="first port (default: free ports)")
    p.add_argument("--config", default="{}", help="SimConfig fields as JSON")
    args = p.parse_args(argv)
    cfg = SimConfig(**json.loads(args.config))

    async def run():
        sims = await serve_sims(args.num, cfg, args.host, port=args.port)
        print(json.dumps({"urls": [s[3] for s in sims], "config": asdict(cfg)}), flush=True)
        await asyncio.gather(*(s[2] for s in sims))

    from pagedserve.cluster.uvicorn_server import new_event_loop

    loop = new_event_loop()
    try:
        loop.run_until_complete(run())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
