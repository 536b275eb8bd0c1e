"""The synchronous engine: add_request / abort_request / step.

Each step schedules, runs one forward pass over the flat batch, samples, and updates sequences
(stop checks, detokenization, block release). It knows nothing of HTTP or processes; the async
engine and the offline `LLM` drive it. This module only wires the parts together:

- `worker.py`: device, model, memory and the `ModelRunner` (`self.worker`)
- `batch_builder.py`: the scheduled entries as the runner's `InputBatch`
- `request_intake.py` and `request_checks.py`: what `add_request` builds and checks (the server runs the
  same checks)
- `sampling.py`: a step's sample rows and the batched sampling (`self.sampler`)
- `beam_search.py`: one beam-search step (`self.beam_search`)
- `output_processor.py`: a sampled token's effects and the `RequestOutput`s (`self.output`)
"""
from __future__ import annotations

import atexit
import gc
import itertools
import json
import logging
import time
from pathlib import Path

import torch

from pagedserve.config import EngineConfig
from pagedserve.engine import request_intake as intake
from pagedserve.engine.batch_builder import build_input_batch
from pagedserve.engine.beam_search import BeamSearch
from pagedserve.engine.block_manager import BlockManager
from pagedserve.engine.output_processor import OutputProcessor
from pagedserve.engine.overlap import InFlightStep, launch_sampling, resolve
from pagedserve.engine.request_checks import EngineLimits, check_request
from pagedserve.engine.sampling import StepSampler
from pagedserve.engine.scheduler import ScheduledSeq, Scheduler
from pagedserve.engine.sequence import Request, Sequence, Status
from pagedserve.engine.spec_decode.config import SpeculativeConfig
from pagedserve.engine.spec_decode.speculator import Speculator, make_proposer
from pagedserve.engine.tp_rank_main import worker_main
from pagedserve.engine.worker import Worker
from pagedserve.errors import ConfigError, InvalidRequestError, PagedServeError
from pagedserve.model.hf_config import is_longrope
from pagedserve.model.loader import load_tokenizer
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import SamplingParams
from pagedserve.structured.manager import StructuredOutputManager

log = logging.getLogger("pagedserve.engine")


def _from_worker(name: str) -> property:
    return property(lambda self: getattr(self.worker, name), doc=f"The worker's `{name}`.")


class LLMEngine:
    # Device, model and memory facts live on the worker; the engine reads them through.
    device = _from_worker("device")
    dtype = _from_worker("dtype")
    model_dir = _from_worker("model_dir")
    hf_config = _from_worker("hf_config")
    args = _from_worker("args")
    quantization = _from_worker("quantization")
    kv_dtype = _from_worker("kv_dtype")
    tp = _from_worker("tp")
    model = _from_worker("model")
    runner = _from_worker("runner")
    num_kv_blocks = _from_worker("num_kv_blocks")
    max_model_len = _from_worker("max_model_len")
    max_num_batched_tokens = _from_worker("max_num_batched_tokens")
    served_model_name = _from_worker("served_model_name")
    load_seconds = _from_worker("load_seconds")

    def __init__(self, config: EngineConfig):
        self.config = config
        spec = SpeculativeConfig.parse(config.speculative_config)  # a bad config fails before any loading
        self.worker = w = Worker(config, tp_worker_main=worker_main)  # cheap checks first: fail before loading
        self.tokenizer = load_tokenizer(w.model_dir, config.tokenizer)
        self.eos_token_ids = _eos_ids(w.hf_config, w.model_dir, self.tokenizer)
        w.load_model()
        w.init_kv_cache()
        # Families may stop at more than eos by default (Qwen's ChatML ends) and have embedding rows past
        # the tokenizer (Qwen's padded vocabulary): a prompt may not use those ids.
        self.eos_token_ids |= set(getattr(w.model_cls, "default_stop_ids", ()))
        self.prompt_vocab = getattr(w.model, "sampled_vocab", w.args.vocab_size)
        self._cache_salt = getattr(w.model_cls, "prefix_cache_salt", None)
        self._prompt_lens = w.runner.needs_prompt_lens  # the model reads each token's prompt length
        # LongRoPE rotates a sequence's keys by its length: a cached block may hold the other factor set's keys
        caching = config.enable_prefix_caching and not is_longrope(w.args.rope_scaling)
        self.block_manager = BlockManager(w.num_kv_blocks, config.block_size, caching)
        switch = w.args.rope_scaling["original_max_position_embeddings"] if is_longrope(w.args.rope_scaling) else None
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, w.max_num_batched_tokens, switch)
        self.limits = EngineLimits(self.prompt_vocab, w.max_model_len, config.max_num_seqs,
                                   w.max_num_batched_tokens, config.block_size, w.num_kv_blocks)
        self.requests: dict[str, Request] = {}
        self.failed: list[tuple[str, str]] = []  # requests aborted by an error in their own processing
        self._failed_ids: set[str] = set()
        self._seq_ids = itertools.count()
        self.generator = torch.Generator(device=w.device).manual_seed(config.seed)
        # Structured outputs: grammars compile off the step loop; requests wait there until ready.
        self.structured = StructuredOutputManager(self.tokenizer, w.args.vocab_size, self.eos_token_ids)
        self.request_errors: list[tuple[str, InvalidRequestError]] = []  # failed after add_request: drain them
        self.sampler = StepSampler(self.block_manager, self.eos_token_ids, w.device, self._seq_ids, self.generator)
        self.beam_search = BeamSearch(self.block_manager, self.eos_token_ids, w.max_model_len, self._seq_ids)
        self.output = OutputProcessor(self.tokenizer, self.eos_token_ids, w.max_model_len, self.block_manager,
                                      self.structured)
        # Overlapped scheduling (overlap.py): on by default for one CUDA device; off on CPU, where the
        # forward runs on the calling thread and there is nothing to overlap, and with tensor parallelism.
        on = config.async_scheduling
        if on and w.tp is not None:
            raise ConfigError("async scheduling is not supported with tensor_parallel_size > 1",
                              param="async_scheduling", hint="drop --async-scheduling")
        if on and spec is not None:
            raise ConfigError("async scheduling is not supported with speculative decoding",
                              param="async_scheduling", hint="drop --async-scheduling or --speculative-config")
        self.async_scheduling = on if on is not None else (w.device.type == "cuda" and w.tp is None and spec is None)
        # Speculative decoding (spec_decode/): drafts verified in the step's forward; steps are synchronous.
        self.spec = None if spec is None else Speculator(
            spec, make_proposer(spec, w.args.vocab_size), self.block_manager, self.eos_token_ids, w.max_model_len,
            self.generator)
        self._inflight: InFlightStep | None = None
        self.num_overlapped_steps = 0  # steps whose sampled tokens stayed on the device
        _freeze_startup_objects()
        w.log_startup()

    def kv_bytes_per_block(self) -> int:
        return self.worker.kv_bytes_per_block()

    # -- requests ------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)

    def add_request(self, request_id: str, prompt: str | list[int] | None, params: SamplingParams | None = None,
                    prompt_token_ids: list[int] | None = None, arrival_time: float | None = None,
                    final_only: bool = False) -> Request:
        params = intake.checked_params(params, request_id, self.requests)
        text, ids = intake.prompt_ids(prompt, prompt_token_ids, self.tokenizer)
        max_tokens = check_request(ids, params, self.limits)
        seq = intake.new_sequence(next(self._seq_ids), 0, ids, params, self.tokenizer, self.device)
        if self._cache_salt is not None:
            seq.cache_salt = self._cache_salt(self.args, len(ids))
        req = intake.new_request(request_id, text, ids, params, max_tokens, seq, arrival_time, final_only)
        self.requests[request_id] = req
        if params.structured_outputs is None or self._submit_grammar(req):
            self.scheduler.add(req)
        return req

    def _submit_grammar(self, req: Request) -> bool:
        try:
            return self.structured.submit(req)
        except PagedServeError:  # a cached failure (400) or a full compile queue (429)
            self.requests.pop(req.request_id, None)
            raise

    def _admit_compiled(self) -> None:
        """Hand requests whose grammar is now compiled to the scheduler; fail those that did not compile."""
        ready, failed = self.structured.poll()
        for req in ready:
            self.scheduler.add(req)
        for req, err in failed:
            self.requests.pop(req.request_id, None)
            req.status = Status.FINISHED
            self.request_errors.append((req.request_id, err))

    def abort_request(self, request_id: str) -> bool:
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        if req.params.structured_outputs is not None:
            self.structured.release(req)
        for seq in req.live_seqs:
            seq.finish_reason = "abort"
        self.scheduler.remove(req)
        req.status = Status.FINISHED
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.structured.pending) or self._inflight is not None

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    def stats(self) -> dict:
        s, bm = self.scheduler, self.block_manager
        return {
            "num_running": len(s.running),
            "num_waiting": len(s.waiting),
            "kv_cache_usage": bm.usage(),
            "num_preemptions": s.num_preemptions,
            "prefix_cache_queries": bm.prefix_queries,
            "prefix_cache_hits": bm.prefix_hits,
            "num_kv_blocks": self.num_kv_blocks,
            **(self.spec.stats.as_dict() if self.spec is not None else {}),
        }

    # -- the step --------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule; one forward pass over the flat batch (shared: its errors end the step); then
        per-request work (sampling, beam scoring, stop checks, detokenization), where an exception
        aborts that request only (reported through `take_failed`) and the rest of the batch goes on.

        Overlapped: this step's tokens stay on the device and are processed by the next call, after
        it has launched its own forward; the previous step's are processed here, while the GPU runs."""
        prev, self._inflight = self._inflight, None
        if self.spec is not None:
            self.spec.propose(self.scheduler.running, len(self.requests))
        scheduled = self._schedule(idle_wait=prev is None)
        touched: dict[str, Request] = {}
        now = time.time()
        if scheduled:
            logits, sampled = self._execute(scheduled, now, prev)
            if self.async_scheduling:
                self._inflight = self._launch(logits, sampled, scheduled)
        if prev is not None:
            self._collect(prev, touched)
        if scheduled and self._inflight is None:
            self._commit(scheduled)
            self._process(logits, sampled, now, touched)
        return self._outputs(touched, now)

    def _schedule(self, idle_wait: bool) -> list[ScheduledSeq]:
        if self.structured.pending:
            self._admit_compiled()
        scheduled = self.scheduler.schedule().scheduled
        if not scheduled and idle_wait:
            self.structured.wait(0.01)  # only grammars compiling: do not spin
        return scheduled

    def _execute(self, scheduled: list[ScheduledSeq], now: float, prev: InFlightStep | None
                 ) -> tuple[torch.Tensor, list[ScheduledSeq]]:
        """The model step: block copies and the forward; the scheduled tokens are now in the cache."""
        for e in scheduled:
            if e.request.metrics.first_scheduled_time is None:
                e.request.metrics.first_scheduled_time = now
        self.runner.copy_blocks(self.block_manager.pending_copies)
        self.block_manager.pending_copies.clear()
        batch, sampled = build_input_batch(scheduled, self.config.block_size, self._prompt_lens)
        logits = self.runner.execute(batch, prev.tokens if prev is not None else None)
        for e in scheduled:
            e.seq.num_computed += e.num_tokens - e.num_spec  # drafts count once kept (spec_decode/speculator)
        return logits, sampled

    def _commit(self, scheduled: list[ScheduledSeq]) -> None:
        """Name newly full blocks in the prefix cache (only once every token in them is real)."""
        for e in scheduled:
            if not e.seq.finished:
                self.block_manager.commit(e.seq)

    def _launch(self, logits: torch.Tensor, sampled: list[ScheduledSeq], scheduled: list[ScheduledSeq]
                ) -> InFlightStep | None:
        """Sample on the device and leave this step in flight, when every sampled row allows it."""
        if not sampled or not all(e.request.overlappable for e in sampled):
            return None  # (no row samples: prefill chunks only, nothing to carry over)
        try:
            step = launch_sampling(logits, sampled, scheduled, self.generator, self.max_model_len)
        except Exception:  # noqa: BLE001 - the synchronous path samples request by request
            return None
        self.num_overlapped_steps += 1
        return step

    def _collect(self, step: InFlightStep, touched: dict[str, Request]) -> None:
        """Read an in-flight step's tokens back, write them over its placeholders and process them."""
        tokens = step.read()
        now = time.time()
        for (req, seq, index), tok in zip(step.rows, tokens):
            if seq.finished or req.finished:
                continue  # stopped a step earlier (its row was wasted) or aborted while in flight
            tail = resolve(seq, index)
            self._guarded(req, self.output.append_token, req, seq, tok, None, None, now)
            if not seq.finished:
                seq.token_ids.extend(tail)  # the placeholder of the step launched just now
            touched[req.request_id] = req
        self._commit(step.scheduled)

    def _process(self, logits: torch.Tensor, sampled: list[ScheduledSeq], now: float,
                 touched: dict[str, Request]) -> None:
        """Sample and append each sampled sequence's next token, adding the requests that moved to `touched`."""
        if self.spec is not None:  # verify rows first: what is left are the plain rows
            logits, sampled = self.spec.verify(logits, sampled, now, touched, self._guarded, self.output.append_token)
            if not sampled:
                return
        if self.structured.grammars:
            self.structured.apply_masks(logits, sampled)  # before penalties and sampling
        rows = self.sampler.split(sampled, self._guarded)
        append = self.output.append_token
        if rows.plain_rows:
            self.sampler.greedy_and_append(logits, rows, now, touched, self._guarded, append)
        if rows.rows:
            self.sampler.sample_and_append(logits, rows, now, touched, self._guarded, append)
        for rid, entries in rows.beams.items():
            req = self.requests[rid]
            self._guarded(req, self._beam_step, req, entries, logits, now)
            touched[rid] = req

    def _outputs(self, touched: dict[str, Request], now: float) -> list[RequestOutput]:
        outputs = []
        for req in touched.values():
            if req.request_id in self._failed_ids:
                continue
            if req.params.use_beam_search and not req.finished:
                continue  # beams are reported once, ranked, when the search ends
            if not req.live_seqs and not req.finished:
                self._finish_request(req, now)
            if req.finished or not req.final_only:
                out = self._guarded(req, self.output.make_output, req)
                if out is not None:
                    outputs.append(out)
        self._failed_ids.clear()
        return outputs

    def _beam_step(self, req: Request, entries: list[tuple[Sequence, int]], logits: torch.Tensor,
                   now: float) -> None:
        if self.beam_search.step(req, entries, logits, now):
            self._finish_request(req, now)

    def _finish_request(self, req: Request, now: float) -> None:
        req.status = Status.FINISHED
        req.metrics.finished_time = now
        if req.params.structured_outputs is not None:
            self.structured.release(req)
        self.scheduler.remove(req)
        self.requests.pop(req.request_id, None)

    # -- per-request isolation ---------------------------------------------------
    def _guarded(self, req: Request, fn, *args):
        """fn(*args), unless `req` already failed this step; an exception fails `req` only."""
        if req.request_id in self._failed_ids:
            return None
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - one request's bug must not end the batch
            self._fail_request(req, e)
            return None

    def _fail_request(self, req: Request, e: BaseException) -> None:
        log.error("request %s failed in the engine and was aborted (%s: %s); the batch goes on",
                  req.request_id, type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
        self._failed_ids.add(req.request_id)
        self.failed.append((req.request_id, f"{type(e).__name__}: {e}"))
        self.abort_request(req.request_id)

    def take_failed(self) -> list[tuple[str, str]]:
        """(request id, why) of requests aborted by an error since the last call."""
        out, self.failed = self.failed, []
        return out


def _eos_ids(hf_config: dict, model_dir: Path, tokenizer) -> set[int]:
    """EOS ids from config.json, generation_config.json and the tokenizer, all of them."""
    ids: set[int] = set()
    for src in (hf_config.get("eos_token_id"),):
        if src is not None:
            ids |= set(src) if isinstance(src, list) else {src}
    gen = model_dir / "generation_config.json"
    if gen.exists():
        e = json.loads(gen.read_text()).get("eos_token_id")
        if e is not None:
            ids |= set(e) if isinstance(e, list) else {e}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _freeze_startup_objects() -> None:
    """Collect once, then move everything start-up made (torch, transformers, the tokenizer: ~300K objects)
    out of the collector's reach. A full collection walks them all (160 ms on one CPU core with the default
    model), and Python starts one by itself after enough allocations, i.e. inside some step, which then
    stalls every running stream. Unfreezing first lets a process that builds engines one after another
    (tests) still reclaim the cycles of dropped ones; unfreezing at exit lets the interpreter's last
    collection free native objects (frozen, Triton's bindings report "leaked" instances at shutdown)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    atexit.unregister(gc.unfreeze)  # registered once however many engines start
    atexit.register(gc.unfreeze)

