"""The process main of tensor-parallel ranks 1..T-1.

It lives on the engine side so that `pagedserve.distributed` never imports the engine: the engine
hands `worker_main` to the executor (which spawns it), and it builds the same `Worker` as rank 0
(so every collective of loading and KV sizing lines up), then replays rank 0's steps.
"""
from __future__ import annotations

import logging
import os
import signal
import traceback

import torch

from pagedserve.distributed.executor import become_worker
from pagedserve.engine.worker import Worker
from pagedserve.errors import PagedServeError
from pagedserve.model.attention_metadata import AttentionMetadata
from pagedserve.proc import die_with_parent

log = logging.getLogger("pagedserve.tp")


def worker_main(config, rank: int, port: int, conn, log_level: int) -> None:
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s tp{rank} %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: rank 0 decides
    die_with_parent()
    become_worker(rank, port, conn)
    try:
        worker = Worker(config)
        worker.load_model()
        worker.init_kv_cache()
        worker.log_startup()
    except BaseException as e:  # noqa: BLE001 - one line to rank 0, the rest in the log
        log.debug("tensor-parallel worker %d failed to start:\n%s", rank, traceback.format_exc())
        msg = e.message if isinstance(e, PagedServeError) else f"{type(e).__name__}: {e}"
        try:
            conn.send(("fatal", str(msg).splitlines()[0] if str(msg) else type(e).__name__))
        except OSError:
            pass
        return
    try:
        serve_steps(worker, conn)
    except (EOFError, OSError):
        pass  # rank 0 went away
    except BaseException:  # noqa: BLE001
        log.error("tensor-parallel worker %d crashed:\n%s", rank, traceback.format_exc())
        os._exit(1)
    finally:
        worker.tp.close()


@torch.inference_mode()
def serve_steps(worker: Worker, conn) -> None:
    """Run each step rank 0 sends (its inputs unpacked from the pipe, or one NCCL broadcast) until "stop"."""
    runner, group = worker.runner, worker.tp
    dev = runner.device
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        _, copies, spec, scalars, numel, host = msg
        runner.copy_blocks(copies)
        if host is not None:
            flat = torch.from_numpy(host)
        else:
            flat = group.broadcast(torch.empty(numel, dtype=torch.int64, device=dev))
        t, off = {}, 0
        for name, shape, dtype in spec:
            n = 1
            for s in shape:
                n *= s
            t[name] = flat[off:off + n].view(shape).to(dtype)
            off += n
        input_ids, positions, logit_rows = t.pop("input_ids"), t.pop("positions"), t.pop("logit_rows")
        meta = AttentionMetadata(**t, **scalars)
        runner.run(input_ids, positions, meta, logit_rows)  # joins the collectives; rank 0 samples
