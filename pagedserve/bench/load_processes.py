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
        level = _Level(self, spec, jobs, requests, on_records)
        stop_task = asyncio.ensure_future(stop.wait()) if stop else None
        level.attach()
        try:
            for w, job in zip(level.active, jobs):
                job.setdefault("max_concurrency", None)
                level.send(w, ("level", {"spec": spec, "settings": settings, **job}))
            while level.live - level.finished:
                if not level.started and level.live <= level.ready:
                    if before_start is not None:
                        await before_start()
                    level.go()
                if stop_task is not None and stop_task.done() and not level.stopping:
                    if not level.stop():
                        break
                get = asyncio.ensure_future(level.events.get())
                waits = {get} | ({stop_task} if stop_task is not None and not level.stopping else set())
                await asyncio.wait(waits, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                if get.done():
                    level.handle(*get.result())
                else:
                    get.cancel()
                    level.kill_silent()
        finally:
            if stop_task is not None:
                stop_task.cancel()
            level.detach()
        return level.result()


class _Level:
    """One level's bookkeeping in the parent: which workers are live, ready, finished; what they were dealt
    and sent back; the shared start instant; and the watchdog."""

    def __init__(self, pool: WorkerPool, spec: LevelSpec, jobs: list[dict], requests: Iterator[BenchRequest],
                 on_records: Callable[[list], None] | None):
        self.pool, self.spec, self.jobs, self.requests, self.on_records = pool, spec, jobs, requests, on_records
        self.active = list(range(len(jobs)))
        self.next_index = spec.num_prompts or 0
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.records: list[RequestRecord] = []
        self.raw: list[dict] = []
        self.failures: list[str] = []
        self.live, self.ready, self.finished = set(self.active), set(), set()
        self.interrupted = self.started = self.stopping = False
        self.t_ready = time.monotonic()
        self.t0 = self.wall0 = 0.0
        self.seen = {w: time.monotonic() for w in self.active}
        self.dealt = {w: len(job["items"]) for w, job in zip(self.active, jobs)}
        self.got = {w: 0 for w in self.active}

    # -- the pipes, read by the event loop --------------------------------------------------
    def _on_conn(self, w: int) -> None:
        c = self.pool.conns[w]
        try:
            while c.poll():
                self.events.put_nowait((w, c.recv()))
        except (EOFError, OSError):
            self.loop.remove_reader(c.fileno())
            self.events.put_nowait((w, ("eof",)))

    def _on_exit(self, w: int) -> None:
        self.loop.remove_reader(self.pool.procs[w].sentinel)
        self._on_conn(w)  # what it sent before it died comes first
        self.events.put_nowait((w, ("died",)))

    def attach(self) -> None:
        for w in self.active:
            self.loop.add_reader(self.pool.conns[w].fileno(), self._on_conn, w)
            self.loop.add_reader(self.pool.procs[w].sentinel, self._on_exit, w)

    def detach(self) -> None:
        for w in self.active:
            self.loop.remove_reader(self.pool.conns[w].fileno())
            self.loop.remove_reader(self.pool.procs[w].sentinel)

    # -- control ------------------------------------------------------------------------------
    def fail(self, w: int, why: str) -> None:
        if w in self.live:
            self.live.discard(w)
            proc = self.pool.procs[w]
            dealt, got = self.dealt[w], self.got[w]
            lost = f"; {dealt - got} of its {dealt} requests are missing" if dealt > got else ""
            self.failures.append(f"load-generator worker {w} (pid {proc.pid}) {why}"
                                 + (f" (exit code {proc.exitcode})" if proc.exitcode is not None else "") + lost)

    def send(self, w: int, msg) -> None:
        try:
            self.pool.conns[w].send(msg)
        except (OSError, ValueError):
            self.fail(w, "could not be reached")

    def go(self) -> None:
        """Every live worker is ready: start them all at one shared instant."""
        self.t0, self.wall0 = time.monotonic() + 0.05, time.time() + 0.05
        for w in self.live:
            self.send(w, ("go", self.t0))
        self.started = True

    def stop(self) -> bool:
        """Ctrl-C: running workers send what completed, waiting ones exit. False if the level never started."""
        self.stopping = self.interrupted = True
        for w in self.live - self.finished:
            self.send(w, ("stop",) if self.started else ("exit",))
        return self.started

    def kill_silent(self) -> None:
        """The watchdog: a worker silent for too long is presumed hung."""
        now = time.monotonic()
        for w in list(self.live - self.finished):
            limit = READY_TIMEOUT_S if not self.started else (10.0 if self.stopping else WATCHDOG_S)
            if now - (self.seen[w] if self.started else self.t_ready) > limit:
                self.pool.procs[w].kill()
                self.fail(w, f"sent nothing for {limit:.0f} s and was killed")

    def handle(self, w: int, msg: tuple) -> None:
        self.seen[w] = time.monotonic()
        kind = msg[0]
        if kind == "ready":
            self.ready.add(w)
        elif kind == "records":
            self.records.extend(msg[1])
            self.got[w] += len(msg[1])
            if self.on_records and msg[1]:
                self.on_records(msg[1])
        elif kind == "need":
            self.deal(w)
        elif kind == "done":
            self.finished.add(w)
            if msg[1] is not None:
                self.raw.append(msg[1])
            self.interrupted = self.interrupted or msg[2]
        elif kind in ("died", "eof") and w not in self.finished:
            self.fail(w, "died mid-level" if self.started else "died before the level started")

    def deal(self, w: int) -> None:
        """A --duration level running low: a batch of prompts, or none once the level is over."""
        per = 2 * max(1, self.jobs[self.active.index(w)]["streams"])
        spec = self.spec
        over = self.stopping or (spec.duration and time.monotonic() > self.t0 + spec.duration)
        batch = [] if over else [(self.next_index + i, None, next(self.requests)) for i in range(per)]
        self.next_index += len(batch)
        self.dealt[w] += len(batch)
        self.send(w, ("more", batch))

    def result(self) -> WorkersResult:
        records = sorted(self.records, key=lambda r: r.index)
        end = max((r.start + (r.e2e or 0.0) for r in records), default=0.0)
        return WorkersResult(records, self.raw, self.failures, self.interrupted, self.wall0, self.t0, end)
