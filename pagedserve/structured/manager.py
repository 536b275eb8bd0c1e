"""Engine-side structured outputs: compile off the step loop, mask constrained rows, advance matchers.

- Grammars compile in worker processes (compile_pool.py) under a time and a memory budget, so a
  pathological grammar fails its own request with a 400 instead of occupying the engine, and
  are cached by the constraint in an LRU bounded in bytes. A request whose grammar is not ready
  is held here, not in the scheduler's queue, so it never blocks admission or steps of other
  requests; `poll` hands it to the scheduler once ready.
- One xgrammar matcher per sequence, created on first use by replaying the sequence's output
  tokens. So n > 1 forks (children start where the parent stood) and preemption by recompute
  (tokens are kept, only the KV is recomputed) need no special state copying.
- Each step, the rows that sample for constrained requests get a next-token bitmask, applied in
  place to the logits on their device before any penalty or sampling: logprobs are those of the
  masked distribution (disallowed tokens have -inf). Unconstrained batches skip all of it.
- EOS (the engine's EOS ids are the grammar's stop tokens) is only allowed where the grammar
  accepts, and ends the sequence with finish_reason "stop" (also under ignore_eos).
- A sampled token reaches its matcher at the sequence's next mask, not at once: on a GPU that
  work overlaps the next forward pass instead of adding to every step.
- A constraint with `end_array_on_repeat` also gets a RepeatCloser per sequence, fed the same
  tokens, which narrows the grammar's mask so that its array ends at a repeated item.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import torch

from pagedserve.errors import InvalidRequestError, PagedServeError
from pagedserve.structured.compile_pool import CompilePool
from pagedserve.structured.grammar import cache_key
from pagedserve.structured.repeat_close import RepeatCloser, TokenBytes

log = logging.getLogger("pagedserve.structured")

CACHE_BYTES = 128 << 20  # compiled grammars kept (LRU), by xgrammar's memory_size_bytes
# Threads for batched mask filling: a quarter of the cores, so that on a small CPU host the model's
# own threads keep theirs.
THREADS = max(1, min(8, (os.cpu_count() or 1) // 4))


class StructuredOutputManager:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: set[int], **pool_options):
        self.vocab_size = vocab_size
        # Built once, in the background: engine start-up does not wait for it.
        self._info = ThreadPoolExecutor(1, thread_name_prefix="grammar").submit(
            self._tokenizer_info, tokenizer, vocab_size, sorted(stop_token_ids))
        self.pool = CompilePool(self._info.result, **pool_options)  # budgets: see compile_pool.py
        self._cache: OrderedDict[tuple, Future] = OrderedDict()
        self._sizes: dict[tuple, int] = {}  # key -> bytes, once its compile has finished
        self.cache_bytes = 0
        self._lock = threading.Lock()
        self.pending: dict[str, tuple[object, Future]] = {}  # request id -> (request, compile future)
        self.grammars: dict[str, object] = {}  # admitted request id -> CompiledGrammar
        self.matchers: dict[int, object] = {}  # seq id -> GrammarMatcher
        self.unaccepted: dict[int, int] = {}  # seq id -> its last token, fed to the matcher at its next mask
        self.closers: dict[int, RepeatCloser] = {}  # seq id -> its closer (end_array_on_repeat only)
        self._token_bytes: TokenBytes | None = None
        self.stop_ids = frozenset(stop_token_ids)
        self._bitmask: torch.Tensor | None = None
        self._batch = None  # xgrammar BatchGrammarMatcher: fills many rows in one call, in parallel
        self._xgr_apply_ok = True

    @staticmethod
    def _tokenizer_info(tokenizer, vocab_size: int, stop_ids: list[int]):
        import xgrammar as xgr

        return xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids)

    # -- compilation ---------------------------------------------------------------
    def compile_async(self, so) -> Future:
        """The (cached) compile future of a constraint; failures stay cached too (same answer each time).
        QueueFullError when the compile pool's queue is full."""
        key = cache_key(so)
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None:
                self._cache.move_to_end(key)
                return fut
            fut = self.pool.submit(so)
            self._cache[key] = fut
        fut.add_done_callback(lambda f: self._account(key, f))
        return fut

    def _account(self, key: tuple, fut: Future) -> None:
        """A compile finished: charge its bytes (a failure costs its key) and evict LRU entries past the budget."""
        size = sum(len(p) if isinstance(p, str) else 8 for p in key)
        if fut.exception() is None:
            size += fut.result().memory_size_bytes
        with self._lock:
            if self._cache.get(key) is not fut:
                return
            self._sizes[key] = size
            self.cache_bytes += size
            while self.cache_bytes > CACHE_BYTES and self._sizes:
                old = next((k for k in self._cache if k in self._sizes), None)  # oldest finished entry
                if old is None:
                    break
                del self._cache[old]
                self.cache_bytes -= self._sizes.pop(old)

    def submit(self, req) -> bool:
        """Start compiling `req`'s grammar; True when it is ready now (a cache hit): admit at once.
        A cached failure raises its InvalidRequestError here."""
        fut = self.compile_async(req.params.structured_outputs)
        if fut.done():
            self.grammars[req.request_id] = fut.result()
            return True
        self.pending[req.request_id] = (req, fut)
        return False

    def poll(self) -> tuple[list, list]:
        """Requests whose compilation finished: (ready ones, [(failed one, error)])."""
        ready, failed = [], []
        for rid, (req, fut) in list(self.pending.items()):
            if not fut.done():
                continue
            del self.pending[rid]
            err = fut.exception()
            if err is None:
                self.grammars[rid] = fut.result()
                ready.append(req)
            else:
                if not isinstance(err, PagedServeError):
                    err = InvalidRequestError(f"structured_outputs: {type(err).__name__}: {err}",
                                              param="structured_outputs")
                failed.append((req, err))
        return ready, failed

    def wait(self, timeout: float) -> None:
        """Nothing else to run: sleep until a pending grammar is ready (or `timeout`), without spinning."""
        if self.pending:
            wait([f for _, f in self.pending.values()], timeout=timeout, return_when=FIRST_COMPLETED)

    def release(self, req) -> None:
        self.pending.pop(req.request_id, None)
        self.grammars.pop(req.request_id, None)
        for seq in req.seqs:
            self.matchers.pop(seq.seq_id, None)
            self.unaccepted.pop(seq.seq_id, None)
            self.closers.pop(seq.seq_id, None)

    # -- the step ------------------------------------------------------------------
    def _matcher(self, req, seq):
        """`seq`'s matcher, advanced through all of its tokens."""
        m = self.matchers.get(seq.seq_id)
        if m is None:
            import xgrammar as xgr

            m = xgr.GrammarMatcher(self.grammars[req.request_id])
            closer = self._closer(req)
            for t in seq.output_token_ids:  # a fork or a rebuilt state: replay what was generated
                m.accept_token(t)
                if closer is not None:
                    closer.feed(t)
            self.matchers[seq.seq_id] = m
            if closer is not None:
                self.closers[seq.seq_id] = closer
            self.unaccepted.pop(seq.seq_id, None)
        else:
            t = self.unaccepted.pop(seq.seq_id, None)
            if t is not None:
                if not m.accept_token(t):
                    # Only when every allowed token was also blocked (e.g. EOS before min_tokens).
                    log.warning("request %s: token %d violates its grammar", req.request_id, t)
                if seq.seq_id in self.closers:
                    self.closers[seq.seq_id].feed(t)
        return m

    def _closer(self, req) -> RepeatCloser | None:
        if not req.params.structured_outputs.end_array_on_repeat:
            return None
        if self._token_bytes is None:  # the vocabulary's bytes, sorted: once, 0.2-0.8 s on a 2-core CPU
            self._token_bytes = TokenBytes(self._info.result().decoded_vocab)
        return RepeatCloser(self._token_bytes)

    def apply_masks(self, logits: torch.Tensor, sampled: list) -> None:
        """Mask, in place, the logits rows (one per entry of `sampled`) of constrained requests."""
        rows = [i for i, e in enumerate(sampled) if e.request.request_id in self.grammars]
        if not rows:
            return
        import xgrammar as xgr

        n, words = logits.shape[0], (logits.shape[1] + 31) // 32
        bm = self._bitmask
        if bm is None or bm.shape[0] < n or bm.shape[1] != words:
            bm = self._bitmask = torch.full((max(n, 64), words), -1, dtype=torch.int32,
                                            pin_memory=logits.device.type == "cuda")
        matchers = [self._matcher(sampled[i].request, sampled[i].seq) for i in rows]
        if len(rows) == 1:
            matchers[0].fill_next_token_bitmask(bm, rows[0])
        else:
            if self._batch is None:
                self._batch = xgr.BatchGrammarMatcher(max_threads=THREADS)
            self._batch.batch_fill_next_token_bitmask(matchers, bm, indices=rows)
        if self.closers:
            for i in rows:
                closer = self.closers.get(sampled[i].seq.seq_id)
                if closer is not None and closer.restricts:
                    closer.restrict(bm[i].numpy().view("uint32"))
        mask = bm[:n]
        if logits.device.type != "cpu":
            mask = mask.to(logits.device, non_blocking=True)
        if self._xgr_apply_ok:
            try:
                # All rows constrained (common in a JSON-only workload): no index list to build and copy.
                xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=self.vocab_size,
                                                indices=None if len(rows) == n else rows)
                return
            except Exception as e:  # noqa: BLE001 - e.g. no kernel for this device: use plain torch
                log.warning("xgrammar's bitmask kernel failed (%s); masking with torch ops", e)
                self._xgr_apply_ok = False
        idx = torch.tensor(rows, device=logits.device)
        bits = (mask[idx, :, None] >> torch.arange(32, device=logits.device, dtype=torch.int32)) & 1
        allowed = bits.reshape(len(rows), -1)[:, :logits.shape[1]].bool()
        logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))

    def accept(self, req, seq, token: int) -> bool:
        """Record `seq`'s new token; True when it ends the grammar (the sequence must stop).

        The matcher takes the token at the sequence's next mask, not now: on a GPU that work then
        overlaps the next forward pass instead of adding to every step. The mask only allows a stop
        token (EOS) where the grammar may end, so a stop token is the grammar's end.
        """
        if seq.seq_id in self.matchers:
            self.unaccepted[seq.seq_id] = token
        # else: a fork's first token; its matcher is built by replaying its tokens when first needed
        return token in self.stop_ids
