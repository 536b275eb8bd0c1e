"""What a proposer is: given sequences and how many tokens each may guess, return the guesses.

Kept small so that the next proposers fit without touching the engine:
- `ngram` (ngram.py) reads only the token histories; its guesses are deterministic (`probs` None, a
  one-hot draft distribution for the rejection rule).
- `draft_model` runs a smaller model with its own paged KV cache and returns its sampling distributions
  in `probs`, so the rejection rule stays exact under sampling.
- An EAGLE-3 head also needs the target's hidden states at the verified positions: such a proposer sets
  `needs_hidden_states`, and the engine hands them over through `observe_hidden_states` after the verify
  forward (not built yet: no proposer sets it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from pagedserve.engine.sequence import Sequence


@dataclass
class Drafts:
    tokens: list[list[int]]  # per sequence, at most its k guesses (may be empty)
    # Per sequence, the draft distribution each guess was drawn from ([len(tokens), V]), or None when the
    # guess is deterministic (the rejection rule then treats it as one-hot).
    probs: list[torch.Tensor | None] = field(default_factory=list)


class Proposer(Protocol):
    needs_hidden_states: bool

    def propose(self, seqs: list[Sequence], ks: list[int]) -> Drafts:
        """Up to ks[i] guesses for what follows seqs[i].token_ids."""

    def release(self, seq_ids: set[int]) -> None:
        """Forget per-sequence state of sequences that finished or were preempted."""
