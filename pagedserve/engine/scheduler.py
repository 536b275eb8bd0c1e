"""Iteration-level scheduling under a token budget.

Each step: (1) running requests in decode (one token per live sequence) are
served first, so long prompts never starve ongoing generations; (2) running
requests still prefilling get chunks of what budget is left (chunked
prefill); (3) waiting requests are admitted in arrival order while slots,
budget and KV blocks allow. When blocks run out, the latest-arrived running
request not yet scheduled this step is preempted by recompute: its blocks are
freed (full blocks stay in the prefix cache, so the recompute is often cheap)
and it goes back to the front of the waiting queue.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pagedserve.engine.block_manager import BlockManager
from pagedserve.engine.sequence import Request, Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    request: Request
    num_tokens: int  # tokens computed this step, starting at seq.num_computed
    num_spec: int = 0  # of which speculative drafts (seq.spec_tokens) verified in this forward


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 rope_switch: int | None = None):
        """rope_switch: LongRoPE's switch length (original_max_position_embeddings). A sequence computed
        while no longer than it and grown past it by decoding is recomputed, as transformers does, so
        that all its keys carry the long factors."""
        self.bm = block_manager
        self.rope_switch = rope_switch
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._order: dict[str, int] = {}  # arrival order: lower = higher priority
        self._counter = 0

    # -- queue management -----------------------------------------------
    def add(self, req: Request) -> None:
        self._order[req.request_id] = self._counter
        self._counter += 1
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, req: Request) -> None:
        """Drop a finished or aborted request and free all its blocks."""
        for seq in req.seqs:
            if seq.block_table:
                self.bm.free_seq(seq)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._order.pop(req.request_id, None)

    def _slots(self, req: Request) -> int:
        return len(req.live_seqs) if req.forked else req.num_slots

    def num_running_seqs(self) -> int:
        return sum(self._slots(r) for r in self.running)

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        for seq in req.seqs:
            if seq.block_table:
                self.bm.free_seq(seq)
            seq.num_computed = 0
        self.running.remove(req)
        req.status = Status.WAITING
        order = self._order[req.request_id]
        i = 0
        while i < len(self.waiting) and self._order[self.waiting[i].request_id] < order:
            i += 1
        self.waiting.insert(i, req)
        self.num_preemptions += 1
        out.preempted.append(req)

    # -- one step ----------------------------------------------------------
    def _crossed_switch(self, req: Request) -> bool:
        """Whether a sequence of `req` holds short-factor keys but is now longer than the switch."""
        return any(s.num_computed and not s.rope_long and s.num_tokens > self.rope_switch for s in req.live_seqs)

    def _try_seq(self, seq: Sequence, budget: int) -> tuple[int, bool]:
        """Allocate for the next chunk of `seq`; returns (num_tokens, ok)."""
        if seq.num_computed == 0 and self.rope_switch is not None:  # a (re)computation starts
            seq.rope_long = seq.num_tokens > self.rope_switch
        prefix = self.bm.find_prefix(seq) if not seq.block_table else []
        computed = len(prefix) * self.bm.block_size if prefix else seq.num_computed
        n = min(seq.num_tokens - computed, budget)
        if n <= 0:
            return 0, True
        if seq.spec_tokens:  # a decode with drafts: verify them too when budget and blocks allow, else drop them
            k = len(seq.spec_tokens)
            if n == 1 and not prefix and budget > k and self.bm.allocate(seq, 1 + k):
                return 1 + k, True
            seq.spec_tokens = []
        return n, self.bm.allocate(seq, n, prefix)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        done: set[str] = set()

        bm, bs = self.bm, self.bm.block_size
        for decode_pass in (True, False):
            for req in list(self.running):
                if budget <= 0:
                    break
                if req.request_id in done or req.status != Status.RUNNING or req.seqs[0].stop_scheduling:
                    continue  # (stop_scheduling: its in-flight token is its last; overlapped steps only)
                if decode_pass and self.rope_switch is not None and self._crossed_switch(req):
                    self._preempt(req, out)
                    continue
                if decode_pass and len(req.seqs) == 1:
                    # The common step, without the general path's per-sequence bookkeeping: one sequence,
                    # one token, and it fits the blocks it holds (no new block, no copy-on-write).
                    seq = req.seqs[0]
                    c = seq.num_computed
                    if (seq.finish_reason is None and len(seq.token_ids) - c == 1 and not seq.spec_tokens
                            and c < len(seq.block_table) * bs and bm.blocks[seq.block_table[c // bs]].ref_count == 1):
                        out.scheduled.append(ScheduledSeq(seq, req, 1))
                        budget -= 1
                        done.add(req.request_id)
                        continue
                live = req.live_seqs
                is_decode = all(s.num_tokens - s.num_computed == 1 and s.block_table for s in live)
                if is_decode != decode_pass:
                    continue
                if is_decode and req.params.use_beam_search and budget < len(live):
                    continue  # beams advance together or not at all (a partial step is thrown away)
                entries: list[ScheduledSeq] = []
                for seq in live:
                    while True:
                        n, ok = self._try_seq(seq, budget)
                        if ok:
                            break
                        victim = self._victim(req, done)
                        self._preempt(victim, out)
                        if victim is req:
                            break
                    if req.status != Status.RUNNING or n == 0:
                        break
                    entries.append(ScheduledSeq(seq, req, n, n - 1 if seq.spec_tokens else 0))
                    budget -= n
                if req.status == Status.RUNNING:
                    out.scheduled.extend(entries)
                    done.add(req.request_id)
                    self._share(entries)
                else:
                    budget += sum(e.num_tokens for e in entries)

        if not out.preempted:
            self._admit(out, budget)
        return out

    def _victim(self, req: Request, done: set[str]) -> Request:
        """The lowest-priority (latest-arrived) running request not yet scheduled this step."""
        candidates = [r for r in self.running if r.request_id not in done]
        return max(candidates, key=lambda r: self._order[r.request_id])

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        num_seqs = self.num_running_seqs()  # kept up to date below: recounting per admission is O(n^2)
        while self.waiting and budget > 0:
            req = self.waiting[0]
            if num_seqs + self._slots(req) > self.max_num_seqs:
                break
            entries: list[ScheduledSeq] = []
            ok = True
            for seq in req.live_seqs:
                n, ok = self._try_seq(seq, budget - sum(e.num_tokens for e in entries))
                if not ok:
                    break
                if n == 0:
                    break
                entries.append(ScheduledSeq(seq, req, n))
            if not ok or not entries:
                for seq in req.seqs:  # roll back partial allocations; full blocks stay cached
                    if seq.block_table:
                        self.bm.free_seq(seq)
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            num_seqs += self._slots(req)
            out.scheduled.extend(entries)
            budget -= sum(e.num_tokens for e in entries)
            self._share(entries)

    def _share(self, entries: list[ScheduledSeq]) -> None:
        """Offer the prompt blocks these (final) prefill chunks fill to requests admitted after them in
        this step, through the prefix cache (see BlockManager.commit). Prompt tokens only: generated
        ones may still be placeholders (overlapped steps) and are committed after the step."""
        for e in entries:
            if e.num_tokens > 1:
                self.bm.commit(e.seq, min(e.seq.num_computed + e.num_tokens, e.seq.num_prompt_tokens))
