"""Builders for engine unit tests: requests, sequences and a model-free step loop.

The unit tests construct the engine's classes directly (no model, no tokenizer
download) so each runs in milliseconds; tests/test_scheduler.py keeps the
whole-engine view.
"""
from __future__ import annotations

import itertools

from pagedserve.engine.block_manager import BlockManager
from pagedserve.engine.scheduler import Scheduler, SchedulerOutput
from pagedserve.engine.sequence import Request, Sequence
from pagedserve.sampling_params import SamplingParams

_seq_ids = itertools.count()


def make_request(rid: str, prompt: list[int] | int, max_tokens: int = 16, **params) -> Request:
    """A request of one sequence; an int prompt means that many distinct tokens (no accidental prefix hits)."""
    ids = list(prompt) if not isinstance(prompt, int) else [1000 * (hash(rid) % 1000) + i for i in range(prompt)]
    p = SamplingParams(max_tokens=max_tokens, **params)
    return Request(rid, None, ids, p, max_tokens, [Sequence(next(_seq_ids), 0, ids)])


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8, budget: int = 32,
                   prefix_caching: bool = True) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size, prefix_caching), max_num_seqs, budget)


def run_step(sched: Scheduler, token: int = 7) -> SchedulerOutput:
    """Schedule, then do what the engine does after a forward: count the computed tokens, append a
    sampled token to each sequence whose prompt is fully computed, and name its full blocks."""
    out = sched.schedule()
    for e in out.scheduled:
        e.seq.num_computed += e.num_tokens
        if e.seq.num_computed == e.seq.num_tokens:
            e.seq.token_ids.append(token)
        sched.bm.commit(e.seq)
    sched.bm.check_invariants()
    return out


def chunks(out: SchedulerOutput) -> dict[str, int]:
    """request id -> tokens scheduled this step (summed over its sequences)."""
    got: dict[str, int] = {}
    for e in out.scheduled:
        got[e.request.request_id] = got.get(e.request.request_id, 0) + e.num_tokens
    return got


class CharTokenizer:
    """One character per token id (id = code point): stop strings and detokenization without a model."""

    special = {0}

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i in self.special))
