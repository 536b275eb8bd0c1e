"""The engine core in its own process (engine_process.py); per-request asyncio output streams in the
server process (this module).

    server process                                   engine process (spawned)
    ───────────────                                  ────────────────────────
    AsyncEngine.add_request ─▶ writer thread ─pipe─▶ drain inputs ─▶ LLMEngine.step()
    RequestStream (asyncio)  ◀─ event loop ◀─ reader thread ◀─pipe─ compact deltas + stats

The engine loop never runs on the HTTP event loop: it has its own process (and
GIL), as in vLLM v1. Messages are pickled tuples, batched per step in both
directions. The server keeps nothing about blocks; it sees deltas (new text,
new token ids, new logprobs, finish reason) and a small stats tuple per step.

An exception while running one request (sampling, beam scoring, stop checks,
detokenization) aborts only that request: the engine reports it as an "err"
message and the request's client gets a 500 (`RequestFailedError`) while the
rest of the batch goes on. Only a fault in the shared model step ends the engine
process. Then its end of the output pipe closes: the reader thread sees EOF,
every open stream fails with `EngineDeadError` (HTTP 503, without Retry-After:
the request may be what killed it), `state` becomes "dead", and a new engine
process is started after a backoff (0.5 s doubling to 30 s; `restarts` counts
them), so later requests succeed without a human. A load failure at start-up is
not retried (it is a configuration problem). If the server process dies, the
engine sees EOF on its input pipe and exits, so no orphan keeps the accelerator.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import queue
import threading
import time
from typing import Any

from pagedserve import errors
from pagedserve.config import EngineConfig
from pagedserve.engine.engine_process import EngineOutput, EngineStats, engine_main, unpack_output
from pagedserve.errors import NotReadyError, PagedServeError
from pagedserve.runtime import apply_engine_env, configure_server_threads, engine_on_cpu, restore_env
from pagedserve.sampling_params import SamplingParams

log = logging.getLogger("pagedserve.async_engine")


class EngineDeadError(NotReadyError):
    """The engine process exited; in-flight and new requests fail with 503."""


class EngineDiedMidRequestError(EngineDeadError):
    """The engine died while this request ran. No Retry-After: the request may have caused it, so
    routers must not replay it elsewhere."""

    retry_after = False


# -- the server side ----------------------------------------------------------------------

class RequestStream:
    """Outputs of one or more engine requests (one HTTP request), consumed by one handler.

    Iterating yields lists of `EngineOutput`: everything that arrived since the
    last iteration, so a slow consumer catches up in one chunk instead of lagging.
    """

    __slots__ = ("pending", "_items", "_waiter", "_error", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.pending: set[str] = set()  # engine request ids not finished yet
        self._items: list[EngineOutput] = []
        self._waiter: asyncio.Future | None = None
        self._error: BaseException | None = None
        self._loop = loop

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def put(self, out: EngineOutput) -> None:
        self._items.append(out)
        self._wake()

    def fail(self, err: BaseException) -> None:
        if self._error is None:
            self._error = err
        self._wake()

    @property
    def finished(self) -> bool:
        return not self.pending

    def __aiter__(self):
        return self

    async def __anext__(self) -> list[EngineOutput]:
        while not self._items:
            if self._error is not None:
                raise self._error
            if not self.pending:
                raise StopAsyncIteration
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items, self._items = self._items, []
        return items


class _ReqState:
    __slots__ = ("stream", "arrival", "first", "last", "num_prompt", "num_generated", "pending_first")

    def __init__(self, stream: RequestStream, arrival: float, num_prompt: int):
        self.stream = stream
        self.arrival = arrival
        self.first: float | None = None
        self.last: float | None = None
        self.num_prompt = num_prompt
        self.num_generated = 0
        self.pending_first = True


class EngineObserver:
    """Hooks the server's metrics implement; all are called on the event loop."""

    def on_stats(self, stats: EngineStats) -> None: ...

    def on_output(self, st: _ReqState, num_new_tokens: int, now: float, first: bool, prev: float | None) -> None:
        """`prev`: when this request's previous tokens arrived (None before the first)."""

    def on_seq_finished(self, reason: str) -> None: ...

    def on_request_finished(self, request_id: str, st: _ReqState, now: float, reason: str,
                            times: tuple | None) -> None: ...


class AsyncEngine:
    """Server-side handle of the engine process. All public methods run on the event loop."""

    def __init__(self, config: EngineConfig, observer: EngineObserver | None = None,
                 log_level: int = logging.INFO):
        self.config = config
        self.observer = observer or EngineObserver()
        self.log_level = log_level
        self.state = "created"  # created | loading | ready | dead | stopped
        self.error: str | None = None
        self.info: dict[str, Any] = {}
        self.stats = EngineStats()
        self._requests: dict[str, _ReqState] = {}
        self.num_pending_first = 0  # accepted requests that have produced no output yet (waiting or prefill)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._proc = None
        self._in = None
        self._out = None
        self._sendq: queue.SimpleQueue = queue.SimpleQueue()
        self._ready = None  # asyncio.Future: set when ready, exception when the load failed
        self._stopping = False
        self.auto_restart = True  # start a new engine process when a running one dies
        self.restarts = 0
        self.restarting = False
        self._ever_ready = False
        self._ready_at = 0.0
        self._backoff = 0.5
        self._gen = 0  # engine process generation: messages from a previous (dead) process are dropped

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        """Spawn the engine process; returns at once (loading continues in the background)."""
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        self._sendq = queue.SimpleQueue()  # a fresh one per engine process (a restart leaves the old writer)
        ctx = mp.get_context("spawn")
        in_r, in_w = ctx.Pipe(duplex=False)
        out_r, out_w = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=engine_main, args=(self.config, in_r, out_w, self.log_level),
                                 name="pagedserve-engine", daemon=True)
        # The child inherits os.environ at spawn: its OpenMP settings (runtime.engine_env) must be there
        # before its libgomp loads. This process keeps one torch thread: the cores are the engine's.
        old = apply_engine_env(cpu=engine_on_cpu(self.config.device))
        try:
            self._proc.start()
        finally:
            restore_env(old)
        configure_server_threads()
        # Close our copies of the child's ends: the child's death then reads as EOF.
        in_r.close()
        out_w.close()
        self._in, self._out = in_w, out_r
        self.state = "loading"
        self._gen += 1
        threading.Thread(target=self._reader, args=(self._gen,), name="engine-reader", daemon=True).start()
        threading.Thread(target=self._writer, name="engine-writer", daemon=True).start()

    async def wait_ready(self) -> dict:
        await asyncio.shield(self._ready)
        return self.info

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def is_ready(self) -> bool:
        return self.state == "ready"

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Ask the engine to exit; terminate it if it does not."""
        if self._proc is None or self.state == "stopped":
            return
        self._stopping = True
        if self.state == "loading":
            timeout = 0.0  # nothing to drain: do not wait for the load to finish
        for st in list(self._requests.values()):
            st.stream.fail(NotReadyError("the server is shutting down"))
        self._requests.clear()
        self._sendq.put(("shutdown",))
        proc = self._proc
        deadline = time.monotonic() + timeout
        while proc.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if proc.is_alive():
            log.warning("engine process did not exit in %.0fs; killing it", timeout)
            proc.kill()
        await asyncio.to_thread(proc.join, 5)
        self.state = "stopped"
        self._sendq.put(None)  # stops the writer thread

    # -- requests ------------------------------------------------------------------
    def new_stream(self) -> RequestStream:
        return RequestStream(self._loop)

    def check_ready(self) -> None:
        if self.state == "ready":
            return
        if self.state == "dead":
            if self.restarting:
                raise EngineDeadError(f"the engine process died ({self.error}); a new one is starting, retry shortly")
            raise EngineDeadError(f"the engine process died: {self.error}", hint="restart the server")
        if self.state in ("created", "loading"):
            raise NotReadyError("the model is still loading; retry shortly")
        raise NotReadyError("the server is shutting down")

    def add_request(self, stream: RequestStream, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float | None = None) -> None:
        self.check_ready()
        if request_id in self._requests:
            raise errors.InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        arrival = arrival_time or time.time()
        self._requests[request_id] = _ReqState(stream, arrival, len(prompt_token_ids))
        self.num_pending_first += 1
        stream.pending.add(request_id)
        self._sendq.put(("add", request_id, prompt_token_ids, params, arrival))

    def abort(self, request_ids) -> None:
        """Abort unfinished requests (client gone); their blocks are freed at the engine's next iteration."""
        gone = []
        now = time.time()
        for rid in request_ids:
            st = self._requests.pop(rid, None)
            if st is None:
                continue
            if st.pending_first:
                self.num_pending_first -= 1
            st.stream.pending.discard(rid)
            gone.append(rid)
            self.observer.on_request_finished(rid, st, now, "abort", None)
        if gone and self.state == "ready":
            self._sendq.put(("abort", gone))

    def abort_stream(self, stream: RequestStream) -> None:
        if stream.pending:
            self.abort(list(stream.pending))

    # -- threads ---------------------------------------------------------------------
    def _writer(self) -> None:
        q, conn = self._sendq, self._in
        while True:
            msg = q.get()
            if msg is None:
                return
            batch = [msg]
            while True:
                try:
                    m = q.get_nowait()
                except queue.Empty:
                    break
                if m is None:
                    q.put(None)
                    break
                batch.append(m)
            try:
                conn.send(batch)
            except (OSError, ValueError):
                return  # the engine is gone; the reader reports it

    def _from(self, gen: int, fn, *args) -> None:
        if gen == self._gen:
            fn(*args)

    def _reader(self, gen: int) -> None:
        conn, loop, proc = self._out, self._loop, self._proc
        try:
            while True:
                msg = conn.recv()
                if msg[0] == "out":
                    msg = ("out", [unpack_output(o) for o in msg[1]], EngineStats(*msg[2]))
                elif msg[0] == "stats":
                    msg = ("stats", EngineStats(*msg[1]))
                loop.call_soon_threadsafe(self._from, gen, self._on_message, msg)
                if msg[0] == "fatal":
                    break
        except (EOFError, OSError):
            pass
        except RuntimeError:
            return  # the event loop closed: the server is exiting
        except Exception as e:  # noqa: BLE001 - unpickling trouble: treat as death, say why
            log.exception("engine output pipe failed")
            loop.call_soon_threadsafe(self._from, gen, self._on_dead, f"output pipe failed: {e}")
            return
        code = None
        if proc is not None:
            proc.join(2)
            code = proc.exitcode
        try:
            loop.call_soon_threadsafe(self._from, gen, self._on_dead, f"engine process exited (exit code {code})")
        except RuntimeError:
            pass  # loop closed: the server is gone

    # -- event-loop side ---------------------------------------------------------------
    def _on_message(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "out":
            self._on_outputs(msg[1])
            self._set_stats(msg[2])
        elif kind == "stats":
            self._set_stats(msg[1])
        elif kind == "err":
            _, rid, cls_name, message, param = msg
            st = self._requests.pop(rid, None)
            if st is not None:
                if st.pending_first:
                    self.num_pending_first -= 1
                st.stream.pending.discard(rid)
                cls = getattr(errors, cls_name, None)
                if not (isinstance(cls, type) and issubclass(cls, PagedServeError)):
                    cls = errors.InvalidRequestError
                st.stream.fail(cls(message, param=param))
        elif kind == "ready":
            self.info = msg[1]
            self.state = "ready"
            self.restarting = False
            self._ever_ready = True
            self._ready_at = time.monotonic()
            if self.restarts:
                log.info("engine restarted (restart #%d, pid %d)", self.restarts, self.info.get("pid", 0))
            if not self._ready.done():
                self._ready.set_result(self.info)
        elif kind == "fatal":
            self._on_dead(msg[1])

    def _set_stats(self, stats: EngineStats) -> None:
        self.stats = stats
        self.observer.on_stats(stats)

    def _on_outputs(self, outs: list[EngineOutput]) -> None:
        now = time.time()
        obs = self.observer
        for o in outs:
            st = self._requests.get(o.request_id)
            if st is None:
                continue  # aborted meanwhile
            first = st.pending_first
            if first:
                st.pending_first = False
                self.num_pending_first -= 1
            ntok = 0
            for sd in o.seqs:
                ntok += len(sd.token_ids)
                if sd.finish_reason is not None:
                    obs.on_seq_finished(sd.finish_reason)
            prev = st.last
            if ntok:
                if st.first is None:
                    st.first = now
                st.last = now
                st.num_generated += ntok
            obs.on_output(st, ntok, now, first, prev)
            st.stream.put(o)
            if o.finished:
                del self._requests[o.request_id]
                st.stream.pending.discard(o.request_id)
                reason = next((sd.finish_reason for sd in o.seqs if sd.finish_reason), "stop")
                obs.on_request_finished(o.request_id, st, now, reason, o.times)
                if not st.stream.pending:
                    st.stream._wake()

    def _on_dead(self, why: str) -> None:
        if self.state in ("dead", "stopped"):
            return
        if self._stopping:
            self.state = "stopped"
            return
        was_loading = self.state == "loading"
        self.state = "dead"
        self.error = why
        log.error("engine %s: %s", "failed to load" if was_loading else "died", why)
        self._sendq.put(None)  # stops this engine's writer thread
        restart = self.auto_restart and self._ever_ready
        err = EngineDiedMidRequestError(f"the engine process died while this request was running ({why})" +
                                        ("; it is restarting" if restart else ""),
                                        hint=None if restart else "restart the server")
        for st in self._requests.values():
            st.stream.fail(err)
        self._requests.clear()
        self.num_pending_first = 0
        self.stats = EngineStats()
        self.observer.on_stats(self.stats)
        if restart:
            if time.monotonic() - self._ready_at > 60:
                self._backoff = 0.5  # it ran a good while: this is not a crash loop
            self.restarting = True
            log.warning("starting a new engine process in %.1fs", self._backoff)
            self._loop.call_later(self._backoff, self._restart)
            self._backoff = min(30.0, self._backoff * 2)
        elif self._ready is not None and not self._ready.done():
            self._ready.set_exception(EngineDeadError(why))

    def _restart(self) -> None:
        if self._stopping or self.state != "dead":
            return
        old = self._proc
        if old is not None and old.is_alive():
            old.kill()
        self.restarts += 1
        self.start()
