"""A bounded pool of grammar-compile worker processes with per-compile time and memory budgets.

- Each compile runs in a worker process (compile_worker.py) that is killed when the compile
  passes its time budget; the request then fails with a 400 saying so, and a fresh worker
  takes the slot. A compile that passes the memory budget fails the same way.
- At most `workers` compiles run at once and at most `max_queue` wait; past that, `submit`
  raises QueueFullError (429). Requests without a constraint never touch the pool.
- A worker whose memory grew past `recycle_mib` after a job is replaced, so one huge grammar
  does not keep its memory for the life of the server.
All workers start at the first compile (importing xgrammar takes seconds, not counted in any
budget): a server without structured requests pays nothing.
"""
from __future__ import annotations

import logging
import os
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable

from pagedserve.errors import InvalidRequestError, PagedServeError, QueueFullError, RequestFailedError

log = logging.getLogger("pagedserve.structured")

WORKERS = 2  # compiles running at once
MAX_QUEUE = 32  # compiles waiting; more is a 429
BUDGET_S = 10.0  # wall time of one compile, from when a worker takes it
MEMORY_MIB = 1024  # address space one compile may add to its worker
RECYCLE_MIB = 256  # a worker grown this much past its start is replaced after its job
_PKG_ROOT = str(Path(__file__).resolve().parents[2])


class _Worker:
    def __init__(self, info_json: bytes, memory_mib: int):
        r_job, w_job = os.pipe()
        r_res, w_res = os.pipe()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_PKG_ROOT, os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen([sys.executable, "-m", "pagedserve.structured.compile_worker", str(r_job),
                                      str(w_res), str(memory_mib)], pass_fds=(r_job, w_res), env=env,
                                     stdin=subprocess.DEVNULL)
        os.close(r_job)
        os.close(w_res)
        self.tx, self.rx = Connection(w_job, readable=False), Connection(r_res, writable=False)
        try:
            self.tx.send_bytes(info_json)
            _, self.base_mib = self.rx.recv()
        except (EOFError, OSError) as e:
            self.kill()
            raise RequestFailedError(f"the grammar-compile worker failed to start ({e}, exit code "
                                     f"{self.proc.returncode})") from None
        self.rss_mib = self.base_mib

    def compile(self, so, budget_s: float) -> tuple:
        """The worker's answer for `so`; TimeoutError past the budget, EOFError if it died."""
        self.tx.send(so)
        if not self.rx.poll(budget_s):
            raise TimeoutError
        answer = self.rx.recv()
        self.rss_mib = answer[-1]
        return answer

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.tx.close()
        self.rx.close()


class CompilePool:
    def __init__(self, tokenizer_info: Callable[[], object], workers: int = WORKERS, max_queue: int = MAX_QUEUE,
                 budget_s: float = BUDGET_S, memory_mib: int = MEMORY_MIB, recycle_mib: int = RECYCLE_MIB):
        self._info = tokenizer_info  # blocks until the TokenizerInfo is built
        self._info_json: bytes | None = None
        self.max_queue, self.budget_s, self.memory_mib, self.recycle_mib = max_queue, budget_s, memory_mib, recycle_mib
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._info_lock = threading.Lock()
        self.queued = 0
        self.timeouts = 0  # compiles killed at the budget (logs, tests)
        self.restarts = 0
        self._wanted = threading.Event()  # set by the first submit: every worker starts then
        self._threads = [threading.Thread(target=self._serve, name=f"grammar-compile-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, so) -> Future:
        """A future of the CompiledGrammar for `so`; QueueFullError when `max_queue` compiles wait already."""
        fut: Future = Future()
        with self._lock:
            if self.queued >= self.max_queue:
                raise QueueFullError(f"the grammar compile queue is full ({self.queued} constraints waiting to "
                                     f"compile); retry after a short delay")
            self.queued += 1
        self._wanted.set()
        self._jobs.put((so, fut))
        return fut

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)

    def _start(self) -> _Worker:
        t0 = time.perf_counter()
        with self._info_lock:  # not self._lock: submit() must never wait for the tokenizer info
            if self._info_json is None:
                self._info_json = self._info().serialize_json().encode()
        w = _Worker(self._info_json, self.memory_mib)
        log.info("grammar-compile worker ready in %.1fs (pid %d)", time.perf_counter() - t0, w.proc.pid)
        return w

    def _serve(self) -> None:
        import xgrammar as xgr

        self._wanted.wait()
        worker = self._replace(None, restart=False)
        while (item := self._jobs.get()) is not None:
            so, fut = item
            with self._lock:
                self.queued -= 1
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                if worker is None:
                    worker = self._start()
                t0 = time.perf_counter()
                answer = worker.compile(so, self.budget_s)
                if answer[0] == "ok":
                    fut.set_result(xgr.CompiledGrammar.deserialize_json(answer[1], self._info()))
                    log.debug("grammar compiled in %.3fs (+%.3fs to ship it back)", answer[2],
                              time.perf_counter() - t0 - answer[2])
                else:
                    fut.set_exception(InvalidRequestError(answer[1], param=answer[2]))
                if worker.rss_mib - worker.base_mib > self.recycle_mib:
                    worker.kill()
                    worker = None
            except TimeoutError:
                self.timeouts += 1
                fut.set_exception(InvalidRequestError(
                    f"structured_outputs: compiling the constraint took longer than the {self.budget_s:g} s compile "
                    f"budget and was stopped; simplify the schema or grammar", param="structured_outputs"))
                worker = self._replace(worker)
            except (EOFError, OSError):
                fut.set_exception(InvalidRequestError(
                    f"structured_outputs: compiling the constraint needs more than the {self.memory_mib} MiB compile "
                    f"memory budget; simplify the schema or grammar", param="structured_outputs"))
                worker = self._replace(worker)
            except PagedServeError as e:
                fut.set_exception(e)
            except Exception as e:  # noqa: BLE001 - e.g. deserialization; fail this request, keep serving
                fut.set_exception(RequestFailedError(f"grammar compile failed: {type(e).__name__}: {e}"))
                worker = self._replace(worker)

    def _replace(self, worker: _Worker | None, restart: bool = True) -> _Worker | None:
        """Kill `worker` and start its successor now, so the next job does not wait for a start."""
        self.restarts += restart
        if worker is not None:
            worker.kill()
        try:
            return self._start()
        except PagedServeError as e:
            log.warning("%s", e)
            return None
