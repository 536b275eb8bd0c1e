"""The engine's own process (spawned by AsyncEngine) and the messages it sends the server.

`engine_main` loads the LLMEngine and runs `_EngineCore`: drain the input pipe (add / abort / shutdown),
step, send compact per-step deltas and a stats tuple. The wire types below are what the server side
(async_engine.py) rebuilds from those tuples. Apart from async_engine.py so the server process's
module holds only the server side: this one never runs on the HTTP event loop.
"""
from __future__ import annotations

import logging
import os
import time
import traceback
from typing import NamedTuple

from pagedserve.config import EngineConfig
from pagedserve.errors import PagedServeError
from pagedserve.proc import die_with_parent

log = logging.getLogger("pagedserve.async_engine")


# -- what the server sees (engine -> server) ---------------------------------------------
# On the pipe these travel as plain tuples (pickling named tuples costs ~8x more, and the engine
# process is the bottleneck); the reader thread rebuilds the named tuples.

class TokenLogprob(NamedTuple):
    token_id: int
    logprob: float
    rank: int | None
    token: str  # decoded


class SeqDelta(NamedTuple):
    """What one output sequence gained in one step."""

    index: int
    text: str
    token_ids: list[int]
    # Per new token: (the sampled token's logprob, the top-k alternatives ranked best first).
    logprobs: list[tuple[TokenLogprob, list[TokenLogprob]]] | None
    finish_reason: str | None
    stop_reason: int | str | None


class EngineOutput(NamedTuple):
    request_id: str
    seqs: list[SeqDelta]
    finished: bool
    num_prompt_tokens: int
    num_cached_tokens: int
    # On the last output: (arrival, first_scheduled, first_token, finished) engine timestamps.
    times: tuple[float | None, ...] | None


class EngineStats(NamedTuple):
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0  # cumulative
    prefix_cache_queries: int = 0  # cumulative, tokens
    prefix_cache_hits: int = 0  # cumulative, tokens
    # Speculative decoding, cumulative: verify rows, drafted tokens, kept drafts, kept drafts by position.
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: tuple[int, ...] = ()


def expert_info(engine) -> dict | None:
    """A mixture-of-experts model's expert layout for the server (/metrics), None for a dense model."""
    moe = engine.args.moe
    if moe is None:
        return None
    return {"experts": moe.num_experts, "top_k": moe.top_k, "intermediate_size": moe.intermediate_size,
            "sparse_layers": len(moe.sparse_layers), "shared_intermediate_size": moe.shared_intermediate_size,
            "layout": engine.worker.model.expert_layout()}


def unpack_output(o: tuple) -> EngineOutput:
    """One output tuple off the pipe -> EngineOutput (named tuples rebuilt on the server side)."""
    seqs = []
    for s in o[1]:
        lps = s[3]
        if lps is not None:
            lps = [(TokenLogprob(*a) if a is not None else None, [TokenLogprob(*t) for t in top]) for a, top in lps]
        seqs.append(SeqDelta(s[0], s[1], s[2], lps, s[4], s[5]))
    return EngineOutput(o[0], seqs, o[2], o[3], o[4], o[5])


# -- the engine process ---------------------------------------------------------------
def _pack_logprobs(entries: list[dict], token_ids: list[int], k: int) -> list:
    """Engine entries hold the top-k (ranks 1..k) plus the sampled token; split them."""
    packed = []
    for entry, tok in zip(entries, token_ids):
        sampled, top = None, []
        for tid, lp in entry.items():
            t = (tid, lp.logprob, lp.rank, lp.decoded_token or "")
            if tid == tok:
                sampled = t
            if lp.rank is not None and lp.rank <= k:
                top.append(t)
        top.sort(key=lambda t: t[2])
        packed.append((sampled, top))
    return packed


class _EngineCore:
    """Loop: drain inputs, step, send compact deltas and stats."""

    def __init__(self, engine, in_conn, out_conn):
        self.engine = engine
        self.in_conn = in_conn
        self.out_conn = out_conn
        self.finish_sent: dict[str, set[int]] = {}  # finished output indices already reported (n > 1)
        self.last_stats: tuple | None = None
        self.num_logprobs: dict[str, int] = {}  # requests that asked for logprobs: top-k size

    def stats(self) -> tuple:
        s = self.engine.stats()
        return (s["num_running"], s["num_waiting"], round(s["kv_cache_usage"], 6), s["num_preemptions"],
                s["prefix_cache_queries"], s["prefix_cache_hits"], s.get("spec_num_drafts", 0),
                s.get("spec_num_draft_tokens", 0), s.get("spec_num_accepted_tokens", 0),
                s.get("spec_accepted_per_pos", ()))

    def handle(self, msg: tuple) -> bool:
        kind = msg[0]
        if kind == "add":
            _, rid, ids, params, arrival = msg
            try:
                self.engine.add_request(rid, None, params, prompt_token_ids=ids, arrival_time=arrival)
                if params.logprobs is not None:
                    self.num_logprobs[rid] = params.logprobs
            except PagedServeError as e:
                self.out_conn.send(("err", rid, type(e).__name__, e.message, e.param))
            except Exception as e:  # noqa: BLE001 - a bad request must not kill the engine
                log.exception("request %s rejected by the engine", rid)
                self.out_conn.send(("err", rid, "InvalidRequestError", f"{type(e).__name__}: {e}", None))
        elif kind == "abort":
            for rid in msg[1]:
                self.engine.abort_request(rid)
                self.finish_sent.pop(rid, None)
                self.num_logprobs.pop(rid, None)
        elif kind == "shutdown":
            return False
        return True

    def pack(self, ro) -> tuple:
        """An EngineOutput as plain tuples."""
        sent = self.finish_sent.setdefault(ro.request_id, set())
        seqs = []
        for co, (dtext, dids) in zip(ro.outputs, ro.deltas):
            if co.finish_reason is not None:
                if co.index in sent:
                    continue
                sent.add(co.index)
            elif not dtext and not dids:
                continue
            lps = None
            if co.logprobs is not None and dids:
                lps = _pack_logprobs(co.logprobs[len(co.token_ids) - len(dids):], dids,
                                     self.num_logprobs.get(ro.request_id, 0))
            seqs.append((co.index, dtext, dids, lps, co.finish_reason, co.stop_reason))
        times = None
        if ro.finished:
            self.finish_sent.pop(ro.request_id, None)
            self.num_logprobs.pop(ro.request_id, None)
            m = ro.metrics
            times = (m.arrival_time, m.first_scheduled_time, m.first_token_time, m.finished_time)
        return (ro.request_id, seqs, ro.finished, len(ro.prompt_token_ids), ro.num_cached_tokens, times)

    def run(self) -> None:
        engine, conn = self.engine, self.in_conn
        while True:
            if not engine.has_unfinished_requests():
                self.send_stats_if_changed()
                batches = [conn.recv()]  # idle: block until work arrives
            else:
                batches = []
            while conn.poll():
                batches.append(conn.recv())
            for batch in batches:
                for msg in batch:
                    if not self.handle(msg):
                        return
            if engine.has_unfinished_requests():
                outs = engine.step()
                for rid, e in engine.request_errors:  # failed after acceptance (a grammar that did not compile)
                    self.out_conn.send(("err", rid, type(e).__name__, e.message, e.param))
                    self.num_logprobs.pop(rid, None)
                engine.request_errors.clear()
                for rid, why in engine.take_failed():
                    self.finish_sent.pop(rid, None)
                    self.num_logprobs.pop(rid, None)
                    self.out_conn.send(("err", rid, "RequestFailedError",
                                        f"the engine failed on this request and aborted it ({why}); "
                                        "other requests were not affected", None))
                stats = self.stats()
                if outs or stats != self.last_stats:  # a prefill chunk alone has nothing to report
                    self.last_stats = stats
                    self.out_conn.send(("out", [self.pack(o) for o in outs], stats))

    def send_stats_if_changed(self) -> None:
        stats = self.stats()
        if stats != self.last_stats:
            self.last_stats = stats
            self.out_conn.send(("stats", stats))


def engine_main(config: EngineConfig, in_conn, out_conn, log_level: int) -> None:
    """The engine process: load, say ready (or why not), then run the step loop until told to stop."""
    import signal

    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Ctrl-C and a supervisor's SIGTERM reach the whole process group: the server drains its requests, then
    # stops us with a message (or SIGKILL). If the server dies, our input pipe reads EOF and we exit.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent()  # the server process dies: so do we
    delay = float(os.environ.get("PAGEDSERVE_ENGINE_LOAD_DELAY", "0") or 0)  # tests: observe the loading state
    if delay > 0:
        time.sleep(delay)
    try:
        from pagedserve.engine.llm_engine import LLMEngine
        from pagedserve.runtime import configure_engine_threads

        configure_engine_threads()
        engine = LLMEngine(config)
    except BaseException as e:  # noqa: BLE001 - report any load failure as one line
        msg = str(e) if isinstance(e, PagedServeError) else f"{type(e).__name__}: {e}"
        log.debug("engine load failed:\n%s", traceback.format_exc())
        try:
            out_conn.send(("fatal", msg))
        except OSError:
            pass
        return
    info = {
        "pid": os.getpid(),
        "served_model_name": engine.served_model_name,
        "model_dir": str(engine.model_dir),
        "max_model_len": engine.max_model_len,
        "vocab_size": engine.limits.vocab_size,  # the ids a prompt may hold (Qwen: fewer than embedding rows)
        "num_kv_blocks": engine.num_kv_blocks,
        "block_size": config.block_size,
        "max_num_seqs": config.max_num_seqs,
        "max_num_batched_tokens": engine.max_num_batched_tokens,
        "device": str(engine.device),
        "dtype": str(engine.dtype).replace("torch.", ""),
        "eos_token_ids": sorted(engine.eos_token_ids),
        "load_seconds": engine.load_seconds,
        "experts": expert_info(engine),
    }
    out_conn.send(("ready", info))
    try:
        _EngineCore(engine, in_conn, out_conn).run()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the server went away
    except BaseException as e:  # noqa: BLE001 - tell the server why, then die
        log.error("engine loop crashed:\n%s", traceback.format_exc())
        try:
            out_conn.send(("fatal", f"engine loop crashed: {type(e).__name__}: {e}"))
        except OSError:
            pass
        os._exit(1)
