"""One request (a group of sequences sharing a prompt) and its sequences."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from pagedserve.outputs import Logprob, RequestMetrics
from pagedserve.sampling_params import SamplingParams


# A sampled token the host has not read back yet (overlapped scheduling): the next forward takes it
# from the device, and the engine writes the real id here one step later.
PLACEHOLDER = -1


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Tokens, KV position and decoding state of one output stream.

    `num_computed` counts tokens whose K/V are in the cache. A running sequence
    always has at least one uncomputed token (the last sampled one), so a
    decode step computes exactly one token and a recompute after preemption is
    just a longer prefill of the same list.
    """

    def __init__(self, seq_id: int, index: int, prompt_token_ids: list[int]):
        self.seq_id = seq_id
        self.index = index  # position among the request's outputs
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache
        self.rope_long = False  # LongRoPE: its cached keys carry the long factors (Scheduler.rope_switch)
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # hash chain over this sequence's full, computed blocks
        # Seeds that chain: blocks whose K/V depend on more than their tokens (Qwen's per-request RoPE base)
        # are cached apart. None for most models.
        self.cache_salt: int | None = None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.output_text = ""
        self.text_sent = 0  # chars of output_text already reported as deltas
        self.tokens_sent = 0
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict[int, Logprob]] | None = None
        self.detokenizer = None
        self.generator: torch.Generator | None = None
        # Overlapped scheduling: row of this sequence's last token in the in-flight step's sampled tensor
        # (None once read back), and "this in-flight token is its last" (length limit): schedule no further.
        self.pending_row: int | None = None
        self.stop_scheduling = False
        # Speculative decoding: this step's guessed continuation (verified with the next token, never part
        # of token_ids) and the draft distribution it was drawn from (None: deterministic guesses).
        self.spec_tokens: list[int] = []
        self.spec_probs: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def fork(self, seq_id: int, index: int) -> "Sequence":
        """A copy sharing history; the caller also forks the block table (refcounts)."""
        child = Sequence.__new__(Sequence)
        child.__dict__.update(self.__dict__)
        child.seq_id, child.index = seq_id, index
        child.token_ids = list(self.token_ids)
        child.block_table = list(self.block_table)
        child.block_hashes = list(self.block_hashes)
        child.logprobs = None if self.logprobs is None else list(self.logprobs)
        child.detokenizer = None if self.detokenizer is None else self.detokenizer.copy()
        child.generator = None
        return child


@dataclass
class BeamHypothesis:
    token_ids: list[int]
    cumulative_logprob: float
    score: float
    finish_reason: str
    stop_reason: int | str | None = None


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    seqs: list[Sequence]
    arrival_time: float = field(default_factory=time.time)
    status: Status = Status.WAITING
    metrics: RequestMetrics | None = None
    forked: bool = False  # n>1 / beam: children created after the prompt's prefill
    final_only: bool = False  # report only the finished output (offline use: no per-step outputs to build)
    plain_greedy: bool = False  # SamplingParams.is_plain_greedy, kept for the step's hot loop
    overlappable: bool = False  # SamplingParams.can_overlap, kept for the step's hot loop
    beam_done: list[BeamHypothesis] = field(default_factory=list)
    lora: None = None

    def __post_init__(self):
        if self.metrics is None:
            self.metrics = RequestMetrics(arrival_time=self.arrival_time)

    @property
    def live_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.finished]

    @property
    def num_slots(self) -> int:
        """Sequences this request will occupy at its widest (reserved at admission)."""
        return self.params.num_slots

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED
