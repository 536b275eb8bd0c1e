"""The load generator: one load level (a fixed concurrency or a Poisson request rate) at a time.

A closed-loop level runs `concurrency` workers, each sending its next request
as soon as the previous one ends. An open-loop level sends requests at
gamma-distributed intervals with mean 1/rate (burstiness 1 = Poisson; < 1 is
burstier, > 1 more regular), optionally capped by `max_concurrency`.

The generator watches itself: a probe task measures event-loop lag (how late a
10 ms sleep wakes up) and the process's CPU time is read around the level. A
single asyncio loop can use one core at most, so high client CPU or high lag
means the numbers describe the client, not the server; `client_warnings` says so.
"""
from __future__ import annotations

import asyncio
import math
import random
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import httpx

from pagedserve.bench.client import BenchRequest, ClientPool, RequestRecord, build_body, send_request
from pagedserve.bench.metrics import percentile

CLIENT_CPU_WARN = 0.80  # fraction of one core
LOOP_LAG_WARN = 0.020  # seconds (P99)
DISPATCH_LAG_WARN = 0.010  # seconds (P99, rate mode)
SEND_DELAY_WARN = 0.050  # seconds (P99) from a request's start to its headers on the wire


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


@dataclass
class LevelResult:
    spec: LevelSpec
    records: list[RequestRecord]
    duration: float
    started_at: float  # wall clock (time.time())
    client: dict = field(default_factory=dict)
    server: dict | None = None  # the server's own latency means over the level (from /metrics)


class LoopMonitor:
    """Samples event-loop lag (how much later than asked a short sleep returns) and the
    process's CPU time, so bursts of client work show up even in a long, mostly idle level."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.lags: list[float] = []
        self.cpu: list[tuple[float, float]] = []  # (wall, process CPU) samples
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            t = time.perf_counter()
            self.cpu.append((t, time.process_time()))
            await asyncio.sleep(self.interval)
            self.lags.append(max(0.0, time.perf_counter() - t - self.interval))

    def peak_cpu(self, window: float = 1.0) -> float:
        """Highest CPU use (fraction of one core) over any `window` seconds of samples."""
        best, j = 0.0, 0
        for i in range(len(self.cpu)):
            while self.cpu[i][0] - self.cpu[j][0] > window:
                j += 1
            dt = self.cpu[i][0] - self.cpu[j][0]
            if dt >= window * 0.5:
                best = max(best, (self.cpu[i][1] - self.cpu[j][1]) / dt)
        return best

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


def gamma_intervals(rate: float, burstiness: float, rng: random.Random) -> Iterator[float]:
    """Inter-arrival times with mean 1/rate and coefficient of variation 1/sqrt(burstiness)."""
    if math.isinf(rate):
        while True:
            yield 0.0
    theta = 1.0 / (rate * burstiness)
    while True:
        yield rng.gammavariate(burstiness, theta)


async def prewarm(pool: ClientPool, url: str, streams: int) -> None:
    """Open `streams` keep-alive connections (one per closed-loop worker) before the clock starts.

    Without it the first wave of requests pays TCP set-up and httpx's first-use costs
    (tens of ms on a busy machine), which is the client's cost, not the server's.
    Any answer opens a connection, so the GET's status does not matter.
    """
    base = url.split("/v1/")[0] if "/v1/" in url else url.rsplit("/", 1)[0]

    async def one(i: int) -> None:
        try:
            await pool.get(i).get(base + "/v1/models", timeout=10.0)
        except httpx.HTTPError:
            pass

    await asyncio.gather(*(one(i) for i in range(streams)))


async def run_level(spec: LevelSpec, settings: RequestSettings, requests: Iterator[BenchRequest],
                    pool: ClientPool, on_done: Callable[[RequestRecord, int], None] | None = None) -> LevelResult:
    """Run one level to completion; `on_done(record, in_flight)` is called after every request."""
    if spec.mode == "concurrency":
        await prewarm(pool, settings.url, int(spec.load))
    metrics_before = await scrape_server_metrics(pool, settings.url)
    records: list[RequestRecord] = []
    in_flight = 0
    monitor = LoopMonitor()
    monitor.start()
    cpu0, wall0 = time.process_time(), time.time()
    t_origin = time.perf_counter()
    deadline = t_origin + spec.duration if spec.duration else math.inf
    budget = spec.num_prompts if spec.num_prompts is not None else math.inf
    counter = 0

    def next_request() -> tuple[int, BenchRequest] | None:
        nonlocal counter
        if counter >= budget or time.perf_counter() >= deadline:
            return None
        counter += 1
        return counter - 1, next(requests)

    async def one(i: int, req: BenchRequest, shard: int, scheduled: float | None = None) -> None:
        nonlocal in_flight
        rec = RequestRecord(i, scheduled=scheduled, expected_prompt_len=req.prompt_len, max_tokens=req.output_len)
        body = build_body(req, settings.model, settings.endpoint, settings.ignore_eos, settings.temperature,
                          settings.extra_body)
        in_flight += 1
        try:
            await send_request(pool.get(shard), settings.url, body, rec, t_origin, settings.timeout)
        finally:
            in_flight -= 1
        records.append(rec)
        if on_done:
            on_done(rec, in_flight)

    try:
        if spec.mode == "concurrency":
            async def worker(w: int) -> None:
                while (item := next_request()) is not None:
                    await one(*item, shard=w)

            await asyncio.gather(*(worker(w) for w in range(int(spec.load))))
        else:
            sem = asyncio.Semaphore(spec.max_concurrency) if spec.max_concurrency else None
            tasks: set[asyncio.Task] = set()
            intervals = gamma_intervals(spec.load, spec.burstiness, random.Random(spec.seed))
            t_next = 0.0
            while (item := next_request()) is not None:
                delay = t_origin + t_next - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if sem:
                    await sem.acquire()

                async def guarded(item=item, scheduled=t_next) -> None:
                    try:
                        await one(*item, shard=item[0], scheduled=scheduled)
                    finally:
                        if sem:
                            sem.release()

                task = asyncio.create_task(guarded())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                t_next += next(intervals)
            if tasks:
                await asyncio.gather(*tasks)
    finally:
        await monitor.stop()
    wall = time.perf_counter() - t_origin
    cpu = time.process_time() - cpu0
    end = max((r.start + (r.e2e or 0.0) for r in records), default=wall)
    records.sort(key=lambda r: r.index)
    client = {
        "cpu_s": cpu,
        "cpu_fraction": cpu / wall if wall > 0 else 0.0,  # of one core; asyncio runs on one
        "cpu_peak_fraction": max(monitor.peak_cpu(), 0.0),  # busiest second
        "loop_lag_p50_ms": _ms(percentile(monitor.lags, 50)),
        "loop_lag_p99_ms": _ms(percentile(monitor.lags, 99)),
        "loop_lag_max_ms": _ms(max(monitor.lags, default=None)),
    }
    delays = [r.send_delay for r in records if r.send_delay is not None]
    client["send_delay_p50_ms"] = _ms(percentile(delays, 50))
    client["send_delay_p99_ms"] = _ms(percentile(delays, 99))
    if spec.mode == "rate":
        lags = [r.start - r.scheduled for r in records if r.scheduled is not None]
        client["dispatch_lag_p99_ms"] = _ms(percentile(lags, 99))
        client["offered_rate"] = len(records) / max(max((r.start for r in records), default=0.0), 1e-9)
    client["warnings"] = client_warnings(client, spec)
    server = server_side(metrics_before, await scrape_server_metrics(pool, settings.url)) if metrics_before else None
    return LevelResult(spec, records, end, wall0, client, server)


_PROM = re.compile(r"^vllm:(time_to_first_token_seconds|e2e_request_latency_seconds|time_per_output_token_seconds)"
                   r"_(sum|count)(?:\{[^}]*\})?\s+(\S+)", re.M)


async def scrape_server_metrics(pool: ClientPool, url: str) -> dict | None:
    """Sums and counts of the server's vLLM-named latency histograms from GET /metrics, or None.

    Comparing their means over a level with the client's own shows how much of the
    reported latency the client adds (it assumes nobody else uses the server meanwhile).
    """
    base = url.split("/v1/")[0] if "/v1/" in url else url.rsplit("/", 1)[0]
    try:
        r = await pool.get(0).get(base + "/metrics", timeout=10.0)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    out: dict[str, float] = {}
    for name, kind, value in _PROM.findall(r.text):
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


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000.0


def client_warnings(client: dict, spec: LevelSpec) -> list[str]:
    """Plain-language warnings when the load generator, not the server, limited a level."""
    out = []
    cpu = max(client["cpu_fraction"], client.get("cpu_peak_fraction") or 0.0)
    lag = (client["loop_lag_p99_ms"] or 0.0) / 1000.0
    if cpu >= CLIENT_CPU_WARN:
        out.append(f"{spec.label}: the client is the bottleneck — its event loop used {cpu:.0%} of a core "
                   f"in its busiest second (loop lag P99 {lag * 1000:.0f} ms); TTFT/ITL are inflated and "
                   f"throughput understated. Use fewer streams per client or run several clients.")
    elif lag >= LOOP_LAG_WARN:
        out.append(f"{spec.label}: event-loop lag P99 {lag * 1000:.0f} ms while client CPU is only {cpu:.0%}: "
                   f"the client is starved of CPU (sharing cores with the server?); latencies include up to "
                   f"{lag * 1000:.0f} ms of client delay.")
    sd = client.get("send_delay_p99_ms")
    if sd is not None and sd / 1000.0 >= SEND_DELAY_WARN:
        out.append(f"{spec.label}: requests spent up to {sd:.0f} ms (P99) inside the client before their first "
                   f"byte was sent (connection set-up, CPU); TTFT and E2E include it.")
    dl = client.get("dispatch_lag_p99_ms")
    if dl is not None and dl / 1000.0 >= DISPATCH_LAG_WARN and not spec.max_concurrency:
        out.append(f"{spec.label}: requests left up to {dl:.0f} ms (P99) after their scheduled arrival; "
                   f"the offered rate was {client['offered_rate']:.2f}/s.")
    return out
