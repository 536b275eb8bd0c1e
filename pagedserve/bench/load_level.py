"""The load generator: one load level (a fixed concurrency or a Poisson request rate) at a time.

A closed-loop level runs `concurrency` workers, each sending its next request
as soon as the previous one ends. An open-loop level sends requests at
gamma-distributed intervals with mean 1/rate (burstiness 1 = Poisson; < 1 is
burstier, > 1 more regular), optionally capped by `max_concurrency`.

This module runs a level in ONE event loop: the whole load in-process
(`--workers 1`), or one worker's share (pagedserve/bench/load_processes.py). Each loop
watches itself (pagedserve/bench/saturation.py): a level whose client was the
bottleneck is flagged client-bound.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import random
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from pagedserve.bench.client import BenchRequest, RequestRecord, StreamPool, build_body, send_request
from pagedserve.bench.saturation import LoopMonitor, client_warnings, summarize_client  # noqa: F401
from pagedserve.cluster import upstream


@dataclass
class LevelSpec:
    mode: str  # "concurrency" | "rate"
    load: float  # concurrency, or requests/s (math.inf = all at once)
    num_prompts: int | None
    duration: float | None = None
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0

    @property
    def label(self) -> str:
        if self.mode == "concurrency":
            return f"concurrency {int(self.load)}"
        return "rate inf" if math.isinf(self.load) else f"rate {self.load:g}/s"


@dataclass
class RequestSettings:
    url: str
    model: str
    endpoint: str = "completions"
    ignore_eos: bool = False
    temperature: float = 0.0
    timeout: float = 300.0
    extra_body: dict | None = None
    keep_text: bool = False  # decode every request's generated text (--save-text)


@dataclass
class LevelResult:
    spec: LevelSpec
    records: list[RequestRecord]
    duration: float
    started_at: float  # wall clock (time.time())
    client: dict = field(default_factory=dict)
    server: dict | None = None  # the server's own latency means over the level (from /metrics)


def gamma_intervals(rate: float, burstiness: float, rng: random.Random) -> Iterator[float]:
    """Inter-arrival times with mean 1/rate and coefficient of variation 1/sqrt(burstiness)."""
    if math.isinf(rate):
        while True:
            yield 0.0
    theta = 1.0 / (rate * burstiness)
    while True:
        yield rng.gammavariate(burstiness, theta)


class Source:
    """Where a level's requests come from: `take()` -> (index, scheduled time or None, request) or None.

    This one draws from an iterator (the in-process path): a shared budget of
    `num_prompts`, no new request after `duration`, and in rate mode a gamma arrival
    schedule. Worker processes get their share from the parent (pagedserve/bench/load_processes.py).
    """

    def __init__(self, spec: LevelSpec, requests: Iterator[BenchRequest], t_origin: float):
        self.requests, self.t_origin = requests, t_origin
        self.budget = spec.num_prompts if spec.num_prompts is not None else math.inf
        self.duration = spec.duration or math.inf
        self.intervals = gamma_intervals(spec.load, spec.burstiness, random.Random(spec.seed)) \
            if spec.mode == "rate" else None
        self.count = 0
        self.t_next = 0.0

    async def take(self) -> tuple[int, float | None, BenchRequest] | None:
        if self.count >= self.budget or time.perf_counter() - self.t_origin >= self.duration:
            return None
        sched = None
        if self.intervals is not None:
            sched, self.t_next = self.t_next, self.t_next + next(self.intervals)
            if sched >= self.duration:
                return None
        try:
            req = next(self.requests)
        except StopIteration:
            return None
        self.count += 1
        return self.count - 1, sched, req


async def prewarm(pool: StreamPool, url: str, streams: int) -> None:
    """Open `streams` keep-alive connections (one per closed-loop stream) before the clock starts.

    Without it the first wave of requests pays TCP set-up and first-use costs (tens of ms
    on a busy machine), which is the client's cost, not the server's. Any answer opens a
    connection, so the GET's status does not matter.
    """
    base = url.split("/v1/")[0] if "/v1/" in url else url.rsplit("/", 1)[0]

    async def one() -> None:
        try:
            await pool.get(base + "/v1/models")
        except (upstream.UpstreamError, TimeoutError, asyncio.TimeoutError, OSError):
            pass

    await asyncio.gather(*(one() for _ in range(streams)))


async def drive_level(spec: LevelSpec, settings: RequestSettings, source, pool: StreamPool, t_origin: float,
                      on_done: Callable[[RequestRecord, int], None] | None = None,
                      stop: asyncio.Event | None = None, streams: int | None = None,
                      max_concurrency: int | None = None) -> tuple[list[RequestRecord], dict, bool]:
    """The timed part of a level in this event loop, from `t_origin` (a perf_counter time, maybe in
    the future). Returns (records, the monitor's raw numbers, interrupted). Setting `stop` cancels
    the requests in flight and returns the completed ones (Ctrl-C's partial table)."""
    records: list[RequestRecord] = []
    in_flight = 0
    monitor = LoopMonitor()
    if (wait := t_origin - time.perf_counter()) > 0:
        await asyncio.sleep(wait)
    monitor.start()
    if streams is None:
        streams = int(spec.load) if spec.mode == "concurrency" else 0
    cap = spec.max_concurrency if max_concurrency is None else max_concurrency

    async def one(i: int, req: BenchRequest, scheduled: float | None = None) -> None:
        nonlocal in_flight
        rec = RequestRecord(i, scheduled=scheduled, expected_prompt_len=req.prompt_len, max_tokens=req.output_len)
        body = build_body(req, settings.model, settings.endpoint, settings.ignore_eos, settings.temperature,
                          settings.extra_body)
        in_flight += 1
        try:
            await send_request(pool, settings.url, body, rec, t_origin, settings.timeout, settings.keep_text)
        finally:
            in_flight -= 1
        records.append(rec)
        if on_done:
            on_done(rec, in_flight)

    async def closed_loop() -> None:
        async def stream() -> None:
            while (item := await source.take()) is not None:
                await one(item[0], item[2])

        await asyncio.gather(*(stream() for _ in range(streams)))

    async def open_loop() -> None:
        sem = asyncio.Semaphore(cap) if cap else None
        tasks: set[asyncio.Task] = set()
        try:
            while (item := await source.take()) is not None:
                delay = t_origin + item[1] - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if sem:
                    await sem.acquire()

                async def guarded(item=item) -> None:
                    try:
                        await one(item[0], item[2], item[1])
                    finally:
                        if sem:
                            sem.release()

                task = asyncio.create_task(guarded())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for t in list(tasks):
                t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    body = asyncio.ensure_future(closed_loop() if spec.mode == "concurrency" else open_loop())
    interrupted = False
    try:
        if stop is None:
            await body
        else:
            waiter = asyncio.ensure_future(stop.wait())
            await asyncio.wait({body, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if not body.done():
                interrupted = True
                body.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await body
            else:
                body.result()
    finally:
        raw = await monitor.stop()
    records.sort(key=lambda r: r.index)
    return records, raw, interrupted


async def run_level(spec: LevelSpec, settings: RequestSettings, requests: Iterator[BenchRequest],
                    pool: StreamPool, on_done: Callable[[RequestRecord, int], None] | None = None,
                    stop: asyncio.Event | None = None) -> LevelResult:
    """Run one level in this process; `on_done(record, in_flight)` is called after every request."""
    if spec.mode == "concurrency":
        await prewarm(pool, settings.url, int(spec.load))
    metrics_before = await scrape_server_metrics(pool, settings.url)
    wall0 = time.time()
    t_origin = time.perf_counter()
    records, raw, interrupted = await drive_level(spec, settings, Source(spec, requests, t_origin), pool,
                                                  t_origin, on_done, stop)
    return finish_level(spec, records, [raw], wall0, time.perf_counter() - t_origin,
                        server_side(metrics_before, await scrape_server_metrics(pool, settings.url))
                        if metrics_before else None, interrupted=interrupted)


def finish_level(spec: LevelSpec, records: list[RequestRecord], raw: list[dict], wall0: float, wall: float,
                 server: dict | None, failures: list[str] | None = None, interrupted: bool = False) -> LevelResult:
    """A LevelResult from the (merged) records and the workers' raw self-measurements."""
    end = max((r.start + (r.e2e or 0.0) for r in records), default=wall)
    client = summarize_client(raw, records, spec, failures)
    if interrupted:
        client["interrupted"] = True
    return LevelResult(spec, records, end, wall0, client, server)


_PROM = re.compile(r"^vllm:(time_to_first_token_seconds|e2e_request_latency_seconds|time_per_output_token_seconds)"
                   r"_(sum|count)(?:\{[^}]*\})?\s+(\S+)", re.M)


async def scrape_server_metrics(pool: StreamPool, url: str) -> dict | None:
    """Sums and counts of the server's vLLM-named latency histograms from GET /metrics, or None.

    Comparing their means over a level with the client's own shows how much of the
    reported latency the client adds (it assumes nobody else uses the server meanwhile).
    """
    base = url.split("/v1/")[0] if "/v1/" in url else url.rsplit("/", 1)[0]
    try:
        status, text = await pool.get(base + "/metrics")
    except (upstream.UpstreamError, TimeoutError, asyncio.TimeoutError, OSError):
        return None
    if status != 200:
        return None
    out: dict[str, float] = {}
    for name, kind, value in _PROM.findall(text.decode("utf-8", "replace")):
        try:
            out[f"{name}_{kind}"] = out.get(f"{name}_{kind}", 0.0) + float(value)
        except ValueError:
            continue
    return out or None


def server_side(before: dict | None, after: dict | None) -> dict | None:
    """Per-level means (ms) of the server's own TTFT / E2E / time-per-output-token histograms."""
    if not before or not after:
        return None
    out = {}
    for name, key in (("time_to_first_token_seconds", "ttft_mean_ms"), ("e2e_request_latency_seconds", "e2e_mean_ms"),
                      ("time_per_output_token_seconds", "tpot_mean_ms")):
        n = after.get(name + "_count", 0.0) - before.get(name + "_count", 0.0)
        total = after.get(name + "_sum", 0.0) - before.get(name + "_sum", 0.0)
        if n > 0:
            out[key] = total / n * 1000.0
            out[key.replace("_mean_ms", "_count")] = int(n)
    return out or None
