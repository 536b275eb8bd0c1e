"""Tensor-parallel ranks 1..T-1 as worker processes, driven by rank 0 inside the engine process.

Every rank builds the engine's `Worker` the same way (so load, GPU profiling and the KV block count
line up collective by collective); rank 0 alone schedules and samples. Per step, rank 0 sends the
prepared inputs (token ids, positions, attention metadata, pending block copies) to each worker:
a small pickled header on a pipe, the integer tensors packed into one buffer (inside the pipe
message on CPU, one NCCL broadcast on GPU). Then all ranks run the forward, whose all-reduces and
the logits gather keep them in step.

Idle workers block on their pipe, not in a collective, so no timeout fires while the server is
quiet. A worker that dies makes the next step (or the collective it was in) raise
`TensorParallelWorkerError` naming the rank and how it died; the server's engine process then
exits and requests get 503. Workers die with their parent (PDEATHSIG, EOF on the pipe), so
nothing is orphaned.

The worker process's entry point (`pagedserve.engine.tp_rank_main.worker_main`) is passed in by the
engine: this package never imports `pagedserve.engine`.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import time
import weakref
from collections.abc import Callable

import torch

from pagedserve.distributed.group import TPGroup
from pagedserve.distributed.partition import plan_shards_for
from pagedserve.errors import ConfigError, NotReadyError, PagedServeError
from pagedserve.ports import free_port
from pagedserve.proc import describe_exit

log = logging.getLogger("pagedserve.tp")

_worker_rank: tuple[int, int, object] | None = None  # (rank, port, pipe) in a worker process


class TensorParallelWorkerError(NotReadyError):
    """A tensor-parallel worker died or failed; the engine cannot go on (HTTP 503)."""


def _rank_device(device: torch.device, rank: int, tp: int) -> torch.device:
    if device.type != "cuda":
        return device
    n = torch.cuda.device_count()
    if tp > n:
        raise ConfigError(f"tensor_parallel_size={tp} needs {tp} GPUs but {n} are visible", param="tensor_parallel_size",
                          hint="lower --tensor-parallel-size or make more GPUs visible (CUDA_VISIBLE_DEVICES)")
    torch.cuda.set_device(rank)
    return torch.device("cuda", rank)


def _split_threads(tp: int) -> None:
    """CPU: the ranks share the engine's cores (PAGEDSERVE_NUM_THREADS, else this process's CPU affinity)."""
    total = int(os.environ.get("PAGEDSERVE_NUM_THREADS") or 0) or (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    torch.set_num_threads(max(1, total // tp))


def become_worker(rank: int, port: int, conn) -> None:
    """In a worker process, before it builds its model: `init_tensor_parallel` then joins as `rank`."""
    global _worker_rank
    _worker_rank = (rank, port, conn)


def init_tensor_parallel(config, args, device: torch.device, quantization: str | None = None,
                         worker_main: Callable | None = None) -> tuple[TPGroup, torch.device]:
    """Join (a worker) or create (rank 0: spawn the workers first) the tensor-parallel group.

    `worker_main(config, rank, port, conn, log_level)` is what rank 0 runs in each worker process.
    Returns the group the model uses and this rank's device."""
    tp = config.tensor_parallel_size
    if quantization == "awq":  # the checkpoint may say so even without --quantization
        raise ConfigError("AWQ checkpoints are not supported with tensor_parallel_size > 1",
                          param="tensor_parallel_size", hint="use a single rank, or --quantization int8 on a "
                                                             "bf16/fp32 checkpoint")
    shards = plan_shards_for(args, tp)  # refuses splits that cannot work, before anything starts
    if _worker_rank is not None:
        rank, port, conn = _worker_rank
        device = _rank_device(device, rank, tp)
        if device.type == "cpu":
            _split_threads(tp)
        conn.send(("hello",))
        group = TPGroup.join(shards[rank], device, port)
        group.conn = conn
        return group, device
    device = _rank_device(device, 0, tp)
    if device.type == "cpu":
        _split_threads(tp)
    if worker_main is None:
        raise ValueError("init_tensor_parallel on rank 0 needs the worker processes' entry point (worker_main)")
    ex = Executor(config, tp, worker_main)
    group = TPGroup.join(shards[0], device, ex.port)
    group.executor = ex
    ex.group = group
    return group, device


def peers_loaded(group: TPGroup) -> None:
    """Workers report their shard loaded; rank 0 waits for all, raising a worker's failure as one line."""
    ex = getattr(group, "executor", None)
    if ex is None:
        group.conn.send(("loaded",))
    else:
        for rank in range(1, group.size):
            ex.expect(rank, "loaded")


def attach(worker) -> None:
    """Rank 0 only: from now on every step (and block copy) also goes to the workers."""
    ex = getattr(worker.tp, "executor", None)
    if ex is not None:
        worker.runner = TPRunner(worker.runner, ex)


class Executor:
    """Rank 0's handle on the worker processes."""

    def __init__(self, config, tp: int, worker_main: Callable):
        self.port = free_port()
        self.group: TPGroup | None = None
        ctx = mp.get_context("spawn")
        self.procs, self.conns = [], []
        cur = mp.current_process()
        was_daemon = cur.daemon  # the server's engine process is daemonic; its workers are still ours to start
        try:
            cur._config["daemon"] = False
            for rank in range(1, tp):
                parent, child = ctx.Pipe()
                p = ctx.Process(target=worker_main, args=(config, rank, self.port, child, log.getEffectiveLevel()),
                                name=f"pagedserve-tp{rank}", daemon=True)
                p.start()
                child.close()
                self.procs.append(p)
                self.conns.append(parent)
        finally:
            cur._config["daemon"] = was_daemon
        self._finalizer = weakref.finalize(self, _stop_workers, list(self.procs), list(self.conns))
        for rank in range(1, tp):
            self.expect(rank, "hello")
        log.info("tensor parallel: %d ranks, workers %s", tp, ", ".join(str(p.pid) for p in self.procs))

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def expect(self, rank: int, what: str, timeout: float | None = None) -> None:
        """Wait for message `what` from a worker, polling that it is alive; its failure raises here."""
        timeout = timeout or float(os.environ.get("PAGEDSERVE_TP_LOAD_TIMEOUT", "1800"))
        conn, proc = self.conns[rank - 1], self.procs[rank - 1]
        deadline = time.monotonic() + timeout
        while not conn.poll(0.2):
            if not proc.is_alive():
                raise self.dead(rank, "while starting")
            if time.monotonic() > deadline:
                raise TensorParallelWorkerError(f"tensor-parallel worker rank {rank} sent no {what!r} in {timeout:.0f}s")
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            raise self.dead(rank, "while starting") from None
        if msg[0] == "fatal":
            raise ConfigError(f"tensor-parallel rank {rank}: {msg[1]}")
        if msg[0] != what:
            raise TensorParallelWorkerError(f"tensor-parallel worker rank {rank} sent {msg[0]!r}, expected {what!r}")

    def dead(self, rank: int, when: str) -> TensorParallelWorkerError:
        proc = self.procs[rank - 1]
        proc.join(1.0)
        why = "is unresponsive"
        if proc.exitcode is not None:
            why = describe_exit(proc.exitcode)
        return TensorParallelWorkerError(f"tensor-parallel worker rank {rank} (pid {proc.pid}) {why} {when}",
                                         hint="see the server log for its error; restart the server")

    def check_alive(self, when: str) -> None:
        for rank, p in enumerate(self.procs, start=1):
            if not p.is_alive():
                raise self.dead(rank, when)

    def explain(self, err: BaseException) -> TensorParallelWorkerError | None:
        """A collective or pipe failure -> the dead worker behind it, if any."""
        for rank, p in enumerate(self.procs, start=1):
            p.join(0.5 if rank == 1 else 0.05)  # a peer that just broke the collective is exiting
            if not p.is_alive():
                return self.dead(rank, f"during a step ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
        return None

    def send_step(self, msg: tuple) -> None:
        self.check_alive("before a step")
        for conn in self.conns:
            conn.send(msg)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the workers (asking first, then killing) and leave the process group."""
        self._finalizer.detach()
        _stop_workers(self.procs, self.conns, timeout)
        if self.group is not None:
            self.group.close()


def _stop_workers(procs, conns, timeout: float = 5.0) -> None:
    for c in conns:
        try:
            c.send(("stop",))
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(5)
    for c in conns:
        c.close()


class TPRunner:
    """Rank 0's ModelRunner, unchanged, except that each prepared step is also sent to the workers."""

    def __init__(self, inner, ex: Executor):
        self.inner, self.ex = inner, ex
        self._copies: list[tuple[int, int]] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def copy_blocks(self, pairs) -> None:
        self.inner.copy_blocks(pairs)
        self._copies.extend(pairs)

    def execute(self, batch, prev_tokens=None):
        try:
            input_ids, positions, meta, logit_rows = self.inner.prepare(batch, prev_tokens)
            self._send(input_ids, positions, meta, logit_rows)
            return self.inner.run(input_ids, positions, meta, logit_rows)
        except PagedServeError:
            raise
        except (RuntimeError, OSError) as e:  # a collective or pipe broke: name the worker that died
            raise (self.ex.explain(e) or e) from e

    def _send(self, input_ids, positions, meta, logit_rows) -> None:
        tensors = {"input_ids": input_ids, "positions": positions, "logit_rows": logit_rows}
        scalars = {}
        for f in dataclasses.fields(meta):
            if f.name == "derived":
                continue
            v = getattr(meta, f.name)
            if isinstance(v, torch.Tensor):
                tensors[f.name] = v
            else:
                scalars[f.name] = v
        spec = [(k, tuple(t.shape), t.dtype) for k, t in tensors.items()]
        flat = torch.cat([t.reshape(-1).to(torch.int64) for t in tensors.values()])
        on_cpu = flat.device.type == "cpu"
        copies, self._copies = self._copies, []
        self.ex.send_step(("step", copies, spec, scalars, flat.numel(), flat.numpy() if on_cpu else None))
        if not on_cpu:
            self.ex.group.broadcast(flat)
