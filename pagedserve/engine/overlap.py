"""Overlapped (async) scheduling: the host prepares step N+1 while the GPU runs step N.

The synchronous step reads the sampled tokens back before it can schedule the next
step, so the GPU idles while the host does its per-step work (stop checks,
detokenization, output building, scheduling, input preparation). Here the sampled
tokens of step N stay on the device: each sampled sequence gets a PLACEHOLDER as
its last token and remembers its row (`Sequence.pending_row`); the runner fills
those inputs of step N+1 from step N's token tensor on the device. The host copy
of step N's tokens lands in a buffer with an event; after launching step N+1 the
engine waits for it (the GPU is busy with N+1 by then), writes the real ids over
the placeholders and runs the usual per-token processing one step late.

Costs: a sequence that stops (EOS, stop string) has already been scheduled for one
more step, and that row is wasted. Sequences that reach their length limit are not
scheduled again (`stop_scheduling`), so a fixed-length batch wastes nothing.
Requests whose sampling needs the host's view of the latest token
(`SamplingParams.can_overlap` says which) make their step synchronous;
greedy outputs are token-identical either way (tests/test_overlap.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedserve.engine.scheduler import ScheduledSeq
from pagedserve.engine.sequence import PLACEHOLDER, Request, Sequence
from pagedserve.model.sampler import SampleRow, sample_tokens


@dataclass
class InFlightStep:
    """A launched step whose sampled tokens the host has not read yet."""
    scheduled: list[ScheduledSeq]  # committed to the prefix cache once the tokens are real
    rows: list[tuple[Request, Sequence, int]]  # per sampled row: request, sequence, placeholder's index
    tokens: torch.Tensor  # [rows] on the device: the next step's inputs
    host: torch.Tensor  # [rows] host copy, valid once `event` has completed
    event: torch.cuda.Event | None  # None on CPU (the copy is done when it returns)

    def read(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


def launch_sampling(logits: torch.Tensor, sampled: list[ScheduledSeq], scheduled: list[ScheduledSeq],
                    generator: torch.Generator, max_model_len: int) -> InFlightStep:
    """Sample every row on the device, start the copy to the host, and leave placeholders behind."""
    rows = [SampleRow(e.request.params, (), (), e.seq.generator, []) for e in sampled]
    tokens = sample_tokens(logits, rows, generator)
    if tokens.device.type == "cuda":
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
    else:
        host, event = tokens, None
    pending = []
    for j, e in enumerate(sampled):  # only after sampling succeeded: nothing to undo on an error
        req, seq = e.request, e.seq
        pending.append((req, seq, len(seq.token_ids)))
        seq.token_ids.append(PLACEHOLDER)
        seq.pending_row = j
        if seq.num_output_tokens >= req.max_tokens or seq.num_tokens >= max_model_len:
            seq.stop_scheduling = True  # this token ends it by length: do not schedule a wasted row
    return InFlightStep(scheduled, pending, tokens, host, event)


def resolve(seq: Sequence, index: int) -> list[int]:
    """Cut the sequence back to just before its placeholder at `index`; return what followed it (the next
    step's placeholder, if any) so the caller can put it back unless the real token finished the sequence."""
    tail = seq.token_ids[index + 1:]
    del seq.token_ids[index:]
    if not tail:  # else pending_row already names the row of that next placeholder
        seq.pending_row = None
    return tail
