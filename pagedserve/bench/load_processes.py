"""`bench serve --workers N`: one load level spread over N processes, each with its own event loop
and connection pool, so the load generator is not capped by one core.

- **Start**: the workers are spawned once per sweep (`spawn`: no inherited event loop or
  threads). Per level each opens its connections, says ready, and all start at one
  shared monotonic instant the parent picks after the last ready (the barrier); every
  record is timed from that instant, so merged start/end times are comparable.
- **Closed loop**: the streams are split as evenly as possible (the first `c mod N`
  workers get one more); a level with fewer streams than workers uses fewer workers.
  With `--num-prompts` each worker gets a share of the prompts proportional to its
  streams; with `--duration` alone the parent hands prompts out in batches on request.
- **Open loop**: the parent draws the *global* arrival schedule (the same seeded gamma
  process as one process would) and deals arrival i to worker i mod N. The merged
  arrivals are therefore exactly the requested gamma/Poisson process, burstiness included;
  N independent gamma processes at rate/N would superpose to a Poisson-like process only
  for burstiness 1. `--max-concurrency` is split like streams (a per-worker cap).
- **Data**: prompts are made (tokenized) once, in the parent; workers send back raw
  per-request records every 0.5 s, which the parent merges, so percentiles are exact
  and a dead worker loses at most its last half second.
- **Failures**: a worker that dies is reported with the level's surviving records (the
  level is flagged client-bound) and is replaced before the next level; one silent
  for `WATCHDOG_S` is killed. Ctrl-C stops every worker, which send what completed.
"""
from __future__ import annotations

import asyncio
import math
import multiprocessing as mp
import os
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from pagedserve.bench.client import BenchRequest, RequestRecord
from pagedserve.bench.load_level import LevelSpec, RequestSettings, gamma_intervals
from pagedserve.bench.load_process_main import worker_main

STREAMS_PER_WORKER = 64  # the auto rule: one worker per this many concurrent streams
WATCHDOG_S = 30.0  # a worker silent this long mid-level is presumed hung and killed
READY_TIMEOUT_S = 120.0


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_workers(mode: str, loads: list[float], max_concurrency: int | None, num_prompts: list[int] | None,
                 cpus: int | None = None) -> int:
    """One worker per STREAMS_PER_WORKER concurrent streams, at most the usable cores minus one
    (the parent and, often, the server need some), at least 1. Rate mode estimates the streams
    as --max-concurrency, else 2 s of arrivals at the highest finite rate (inf: --num-prompts)."""
    if mode == "concurrency":
        streams = max(loads)
    elif max_concurrency:
        streams = max_concurrency
    else:
        finite = [x * 2 for x in loads if not math.isinf(x)]
        burst = [max(num_prompts or [0])] if any(math.isinf(x) for x in loads) else []
        streams = max(finite + burst + [1])
    cap = max(1, (cpus or usable_cpus()) - 1)
    return max(1, min(cap, math.ceil(streams / STREAMS_PER_WORKER)))


def split(total: int, parts: int) -> list[int]:
    """`total` split into `parts` integers differing by at most one (larger ones first)."""
    q, r = divmod(total, parts)
    return [q + (i < r) for i in range(parts)]


def proportional(total: int, weights: list[int]) -> list[int]:
    """`total` split in proportion to `weights`, remainders to the largest fractions (sums to total)."""
    w = sum(weights)
    exact = [total * x / w for x in weights]
    out = [math.floor(e) for e in exact]
    for i in sorted(range(len(out)), key=lambda i: exact[i] - out[i], reverse=True)[: total - sum(out)]:
        out[i] += 1
    return out


def arrival_schedule(spec: LevelSpec, requests: Iterator[BenchRequest]) -> list[tuple[int, float, BenchRequest]]:
    """The whole level's arrivals (index, time, request): `num_prompts` of them, or those before `duration`."""
    intervals = gamma_intervals(spec.load, spec.burstiness, random.Random(spec.seed))
    out, t = [], 0.0
    budget = spec.num_prompts if spec.num_prompts is not None else math.inf
    while len(out) < budget and t < (spec.duration or math.inf):
        out.append((len(out), t, next(requests)))
        t += next(intervals)
    return out


# -- the parent ---------------------------------------------------------------------------
@dataclass
class WorkersResult:
    records: list[RequestRecord]
    raw: list[dict]  # each finished worker's self-measurement
    failures: list[str]
    interrupted: bool
    wall0: float  # time.time() at the shared start
    t0: float  # time.monotonic() at the shared start: each record's start is relative to it
    wall: float  # seconds from the shared start to the last worker's end


class WorkerPool:
    """N load-generator processes kept for a whole sweep."""

    def __init__(self, n: int, timeout: float, api_key: str | None, max_streams: int):
        self.n, self.timeout, self.api_key = n, timeout, api_key
        self.max_streams = max(1, -(-max_streams // n))
        self.ctx = mp.get_context("spawn")
        self.procs: list = [None] * n
        self.conns: list = [None] * n
        for w in range(n):
            self._spawn(w)

    def _spawn(self, w: int) -> None:
        parent, child = self.ctx.Pipe()
        p = self.ctx.Process(target=worker_main, name=f"bench-worker-{w}", daemon=True,
                             args=(child, w, self.timeout, self.api_key, self.max_streams))
        p.start()
        child.close()
        self.procs[w], self.conns[w] = p, parent

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(("exit",))
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 5
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)
        for c in self.conns:
            c.close()

    def _plan(self, spec: LevelSpec, requests: Iterator[BenchRequest]) -> list[dict]:
        """Each active worker's job: streams, concurrency cap, dealt items and whether it is fed more."""
        if spec.mode == "concurrency":
            streams = [s for s in split(int(spec.load), self.n) if s > 0]
            if spec.num_prompts is not None:
                counts = proportional(spec.num_prompts, streams)
                items, jobs, k = [(i, None, next(requests)) for i in range(spec.num_prompts)], [], 0
                for s, c in zip(streams, counts):
                    jobs.append({"streams": s, "items": items[k:k + c], "feed": False})
                    k += c
                return jobs
            return [{"streams": s, "items": [], "feed": True} for s in streams]
        if math.isinf(spec.load) and spec.num_prompts is None:
            from pagedserve.errors import InvalidRequestError

            raise InvalidRequestError("--request-rate inf needs --num-prompts (an endless burst otherwise)",
                                      param="num_prompts")
        sched = arrival_schedule(spec, requests)
        n = int(max(1, min(self.n, len(sched), spec.max_concurrency or math.inf)))
        caps = split(spec.max_concurrency, n) if spec.max_concurrency else [None] * n
        return [{"streams": 0, "items": sched[w::n], "feed": False, "max_concurrency": max(1, caps[w]) if caps[w]
                 is not None else None} for w in range(n)]

    async def run_level(self, spec: LevelSpec, settings: RequestSettings, requests: Iterator[BenchRequest],
                        stop: asyncio.Event | None = None, on_records: Callable[[list], None] | None = None,
                        before_start: Callable | None = None) -> WorkersResult:
        """Run one level across the workers; `before_start` (async) runs after the barrier, before the clock."""
        for w, p in enumerate(self.procs):  # replace any worker that died in an earlier level
            if not p.is_alive():
                self.conns[w].close()
                self._spawn(w)
        jobs = self._plan(spec, requests)
        next_index = spec.num_prompts or 0
        active = list(range(len(jobs)))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_conn(w: int) -> None:
            c = self.conns[w]
            try:
                while c.poll():
                    events.put_nowait((w, c.recv()))
            except (EOFError, OSError):
                loop.remove_reader(c.fileno())
                events.put_nowait((w, ("eof",)))

        def on_exit(w: int) -> None:
            loop.remove_reader(self.procs[w].sentinel)
            on_conn(w)  # what it sent before it died comes first
            events.put_nowait((w, ("died",)))

        for w in active:
            loop.add_reader(self.conns[w].fileno(), on_conn, w)
            loop.add_reader(self.procs[w].sentinel, on_exit, w)
        records: list[RequestRecord] = []
        raw: list[dict] = []
        failures: list[str] = []
        live = set(active)
        ready: set[int] = set()
        finished: set[int] = set()
        interrupted = False
        seen = {w: time.monotonic() for w in active}
        dealt = {w: len(job["items"]) for w, job in zip(active, jobs)}
        got = {w: 0 for w in active}
        stop_task = asyncio.ensure_future(stop.wait()) if stop else None

        def fail(w: int, why: str) -> None:
            if w in live:
                live.discard(w)
                code = self.procs[w].exitcode
                lost = f"; {dealt[w] - got[w]} of its {dealt[w]} requests are missing" if dealt[w] > got[w] else ""
                failures.append(f"load-generator worker {w} (pid {self.procs[w].pid}) {why}"
                                + (f" (exit code {code})" if code is not None else "") + lost)

        def send(w: int, msg) -> None:
            try:
                self.conns[w].send(msg)
            except (OSError, ValueError):
                fail(w, "could not be reached")

        try:
            for w, job in zip(active, jobs):
                job.setdefault("max_concurrency", None)
                send(w, ("level", {"spec": spec, "settings": settings, **job}))
            started = False
            t_ready = time.monotonic()
            t0 = wall0 = 0.0
            stopping = False
            while live - finished:
                if not started and (live <= ready):
                    if before_start is not None:
                        await before_start()
                    t0, wall0 = time.monotonic() + 0.05, time.time() + 0.05
                    for w in live:
                        send(w, ("go", t0))
                    started = True
                if stop_task is not None and stop_task.done() and not stopping:
                    stopping = interrupted = True
                    for w in live - finished:
                        send(w, ("stop",) if started else ("exit",))
                    if not started:
                        break
                get = asyncio.ensure_future(events.get())
                waits = {get} | ({stop_task} if stop_task is not None and not stopping else set())
                await asyncio.wait(waits, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    now = time.monotonic()
                    for w in list(live - finished):
                        limit = READY_TIMEOUT_S if not started else (10.0 if stopping else WATCHDOG_S)
                        if now - (seen[w] if started else t_ready) > limit:
                            self.procs[w].kill()
                            fail(w, f"sent nothing for {limit:.0f} s and was killed")
                    continue
                w, msg = get.result()
                seen[w] = time.monotonic()
                kind = msg[0]
                if kind == "ready":
                    ready.add(w)
                elif kind == "records":
                    records.extend(msg[1])
                    got[w] += len(msg[1])
                    if on_records and msg[1]:
                        on_records(msg[1])
                elif kind == "need":
                    per = 2 * max(1, jobs[active.index(w)]["streams"])
                    over = stopping or (spec.duration and time.monotonic() > t0 + spec.duration)
                    batch = [] if over else [(next_index + i, None, next(requests)) for i in range(per)]
                    next_index += len(batch)
                    dealt[w] += len(batch)
                    send(w, ("more", batch))
                elif kind == "done":
                    finished.add(w)
                    if msg[1] is not None:
                        raw.append(msg[1])
                    interrupted = interrupted or msg[2]
                elif kind in ("died", "eof") and w not in finished:
                    fail(w, "died mid-level" if started else "died before the level started")
        finally:
            if stop_task is not None:
                stop_task.cancel()
            for w in active:
                loop.remove_reader(self.conns[w].fileno())
                loop.remove_reader(self.procs[w].sentinel)
        records.sort(key=lambda r: r.index)
        end = max((r.start + (r.e2e or 0.0) for r in records), default=0.0)
        return WorkersResult(records, raw, failures, interrupted, wall0, t0, end)
