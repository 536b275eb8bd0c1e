"""One load-generator worker process of `bench serve --workers N` (the parent side is load_processes.py).

It runs its share of each level in its own event loop with its own connection pool: it
opens its connections, says ready, starts at the parent's shared instant, asks for more
prompts when a --duration level runs low, and sends finished records every FLUSH_S
(which doubles as a heartbeat). It ignores SIGINT (the parent turns Ctrl-C into a
"stop") and dies with the parent (PDEATHSIG, EOF on its pipe).
"""
from __future__ import annotations

import asyncio
import collections
import math
import signal
import time
from typing import Callable

from pagedserve.bench.client import RequestRecord, StreamPool
from pagedserve.bench.load_level import drive_level, prewarm

FLUSH_S = 0.5  # how often a worker sends its finished records (and a heartbeat)


class FeedSource:
    """A worker's share of a level: dealt items, optionally refilled by the parent on request."""

    def __init__(self, items: list, deadline: float, ask: Callable[[], None] | None, low_water: int):
        self.items = collections.deque(items)
        self.deadline, self.ask, self.low_water = deadline, ask, low_water
        self.exhausted = ask is None
        self.asked = False
        self.arrived = asyncio.Event()

    def add(self, items: list) -> None:
        if items:
            self.items.extend(items)
        else:
            self.exhausted = True
        self.asked = False
        self.arrived.set()

    def _request(self) -> None:
        if not self.asked and not self.exhausted:
            self.asked = True
            self.ask()

    async def take(self):
        if time.perf_counter() >= self.deadline:
            return None
        while not self.items:
            if self.exhausted:
                return None
            self._request()
            self.arrived.clear()
            await self.arrived.wait()
            if time.perf_counter() >= self.deadline:
                return None
        if len(self.items) < self.low_water:
            self._request()
        return self.items.popleft()


def worker_main(conn, wid: int, timeout: float, api_key: str | None, max_streams: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; Ctrl-C reaches us as a "stop"
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the parent
    except (OSError, AttributeError):
        pass
    # Plain asyncio: uvloop saved nothing measurable per chunk (benchmarks/bench_client_hotpath.py).
    asyncio.run(_worker(conn, wid, StreamPool(max_streams, timeout, api_key)))


async def _worker(conn, wid: int, pool: StreamPool) -> None:
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue = asyncio.Queue()

    def readable() -> None:
        try:
            while conn.poll():
                inbox.put_nowait(conn.recv())
        except (EOFError, OSError):  # the parent is gone
            loop.remove_reader(conn.fileno())
            inbox.put_nowait(("exit",))

    loop.add_reader(conn.fileno(), readable)
    try:
        while True:
            msg = await inbox.get()
            if msg[0] == "exit":
                return
            if msg[0] == "level" and await _level(conn, inbox, pool, msg[1]):
                return
    finally:
        await pool.aclose()


async def _level(conn, inbox: asyncio.Queue, pool: StreamPool, job: dict) -> bool:
    """Run one level's share; True when the parent asked to exit."""
    spec, settings, streams = job["spec"], job["settings"], job["streams"]
    if spec.mode == "concurrency":
        await prewarm(pool, settings.url, streams)
    conn.send(("ready",))
    msg = await inbox.get()
    if msg[0] != "go":
        conn.send(("done", None, True))
        return msg[0] == "exit"
    t_origin = time.perf_counter() + (msg[1] - time.monotonic())
    deadline = t_origin + spec.duration if spec.duration and spec.mode == "concurrency" else math.inf
    source = FeedSource(job["items"], deadline, (lambda: conn.send(("need",))) if job["feed"] else None,
                        2 * max(1, streams))
    stop, pending, leaving = asyncio.Event(), [], []

    def on_done(rec: RequestRecord, _in_flight: int) -> None:
        pending.append(rec)

    async def flush() -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            batch = pending[:]
            pending.clear()
            conn.send(("records", batch))

    async def listen() -> None:
        while True:
            m = await inbox.get()
            if m[0] == "more":
                source.add(m[1])
            elif m[0] in ("stop", "exit"):
                leaving.append(m[0] == "exit")
                stop.set()

    tasks = [asyncio.ensure_future(flush()), asyncio.ensure_future(listen())]
    try:
        _, raw, interrupted = await drive_level(spec, settings, source, pool, t_origin, on_done, stop, streams,
                                                job["max_concurrency"])
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    conn.send(("records", pending[:]))
    conn.send(("done", raw, interrupted))
    return any(leaving)
