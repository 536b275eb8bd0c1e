"""Is the load generator, not the server, the bottleneck? Self-measurement and its verdict.

Each event loop (the bench process, or each `--workers` process) samples its own
event-loop lag (how much later than asked a 10 ms sleep wakes up) and its CPU time.
Per level the samples of all workers are merged (raw, so the percentiles are exact),
together with the per-request send delay (start -> request written) and, in rate
mode, the dispatch lag (scheduled arrival -> start). Above any threshold below the
level is *client-bound* (loop and dispatch lag only from their _BOUND values): its latencies include
the client's own delay and its throughput may be the client's ceiling, so the report
flags it and the knee search never goes past it (pagedserve/bench/report.py).
"""
from __future__ import annotations

import asyncio
import time

from pagedserve.bench.metrics import percentile

CLIENT_CPU_WARN = 0.80  # fraction of one core, in any worker's busiest second
LOOP_LAG_WARN = 0.020  # seconds (P99 over all workers' samples): a warning
LOOP_LAG_BOUND = 0.050  # ... and from here on, client-bound even while its CPU is low (starved)
DISPATCH_LAG_WARN = 0.010  # seconds (P99, rate mode without a concurrency cap): a warning
DISPATCH_LAG_BOUND = 0.050  # ... and from here on the offered rate is the client's, not the one asked for
SEND_DELAY_WARN = 0.050  # seconds (P99) from a request's start to its bytes on the wire


class LoopMonitor:
    """Samples event-loop lag and the process's CPU time, so bursts of client work show up
    even in a long, mostly idle level."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.lags: list[float] = []
        self.cpu: list[tuple[float, float]] = []  # (wall, process CPU) samples
        self._task: asyncio.Task | None = None
        self._cpu0 = self._wall0 = 0.0

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
        self._cpu0, self._wall0 = time.process_time(), time.perf_counter()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> dict:
        """Stop sampling; the raw numbers one worker reports for a level."""
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        wall = time.perf_counter() - self._wall0
        cpu = time.process_time() - self._cpu0
        return {"cpu_s": cpu, "wall_s": wall, "cpu_fraction": cpu / wall if wall > 0 else 0.0,
                "cpu_peak_fraction": self.peak_cpu(), "lags": self.lags}


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000.0


def summarize_client(raw: list[dict], records: list, spec, failures: list[str] | None = None) -> dict:
    """Merge the workers' raw samples with the requests' own client-side delays into the
    level's `client` dict, with `warnings` and the `client_bound` verdict."""
    lags = [x for r in raw for x in r.get("lags", ())]
    client = {
        "workers": max(1, len(raw) + len(failures or ())),
        "cpu_s": sum(r["cpu_s"] for r in raw),
        "cpu_fraction": max((r["cpu_fraction"] for r in raw), default=0.0),  # of one core, busiest worker
        "cpu_peak_fraction": max((r["cpu_peak_fraction"] for r in raw), default=0.0),  # its busiest second
        "worker_cpu_peak": [round(r["cpu_peak_fraction"], 3) for r in raw],
        "loop_lag_p50_ms": _ms(percentile(lags, 50)),
        "loop_lag_p99_ms": _ms(percentile(lags, 99)),
        "loop_lag_max_ms": _ms(max(lags, default=None)),
    }
    delays = [r.send_delay for r in records if r.send_delay is not None]
    client["send_delay_p50_ms"] = _ms(percentile(delays, 50))
    client["send_delay_p99_ms"] = _ms(percentile(delays, 99))
    if spec.mode == "rate":
        dl = [r.start - r.scheduled for r in records if r.scheduled is not None]
        client["dispatch_lag_p99_ms"] = _ms(percentile(dl, 99))
        client["offered_rate"] = len(records) / max(max((r.start for r in records), default=0.0), 1e-9)
    if failures:
        client["worker_failures"] = list(failures)
    client["warnings"] = client_warnings(client, spec)
    client["client_bound"] = is_client_bound(client, spec)
    return client


def is_client_bound(client: dict, spec) -> bool:
    """Every warning makes a level client-bound except mild lags (a busy machine delays a few
    wake-ups or arrivals by 10-50 ms without capping the load the client offers)."""
    lag = (client.get("loop_lag_p99_ms") or 0.0) / 1000.0
    cpu = max(client["cpu_fraction"], client.get("cpu_peak_fraction") or 0.0)
    sd = (client.get("send_delay_p99_ms") or 0.0) / 1000.0
    dl = (client.get("dispatch_lag_p99_ms") or 0.0) / 1000.0
    return bool(cpu >= CLIENT_CPU_WARN or lag >= LOOP_LAG_BOUND or sd >= SEND_DELAY_WARN
                or (dl >= DISPATCH_LAG_BOUND and not spec.max_concurrency) or client.get("worker_failures"))


def client_warnings(client: dict, spec) -> list[str]:
    """Plain-language reasons why the load generator, not the server, limited a level (empty: it did not)."""
    out = []
    cpu = max(client["cpu_fraction"], client.get("cpu_peak_fraction") or 0.0)
    lag = (client.get("loop_lag_p99_ms") or 0.0) / 1000.0
    n = client.get("workers", 1)
    who = "its event loop" if n == 1 else f"one of its {n} worker processes"
    if cpu >= CLIENT_CPU_WARN:
        out.append(f"{spec.label}: the client is the bottleneck — {who} used {cpu:.0%} of a core "
                   f"in its busiest second (loop lag P99 {lag * 1000:.0f} ms); TTFT/ITL are inflated and "
                   f"throughput understated. Use more --workers (or a machine with more free cores).")
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
    for f in client.get("worker_failures", ()):
        out.append(f"{spec.label}: {f}; the level shows the surviving workers' requests only.")
    return out
