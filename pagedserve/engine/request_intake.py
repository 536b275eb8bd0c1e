"""Everything `add_request` does before the scheduler sees a request: validate, tokenize, build.

Kept apart from the engine step so the refusals (each a one-line `InvalidRequestError` naming the
field, which the server turns into a 400) read in one place, in the order they are checked; the
checks against the engine's limits live in `request_checks`, which the server calls too.
"""
from __future__ import annotations

import time
from collections.abc import Container

import torch

from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.engine.sequence import Request, Sequence
from pagedserve.errors import InvalidRequestError
from pagedserve.sampling_params import SamplingParams


def checked_params(params: SamplingParams | None, request_id: str, in_use: Container[str]) -> SamplingParams:
    params = params or SamplingParams()
    params.validate()  # again: fields may have been changed since construction
    if request_id in in_use:
        raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
    return params


def prompt_ids(prompt: str | list[int] | None, prompt_token_ids: list[int] | None, tokenizer
               ) -> tuple[str | None, list[int]]:
    """(prompt text if given, prompt token ids): the ids win; else a string is tokenized."""
    text = prompt if isinstance(prompt, str) else None
    if prompt_token_ids is None:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt: must not be empty", param="prompt")
            prompt_token_ids = tokenizer.encode(prompt)
        elif isinstance(prompt, list):
            prompt_token_ids = prompt
        else:
            raise InvalidRequestError("prompt: must be a string or a list of token ids", param="prompt")
    return text, prompt_token_ids


def new_request(request_id: str, text: str | None, ids: list[int], params: SamplingParams, max_tokens: int,
                first_seq: Sequence, arrival_time: float | None, final_only: bool) -> Request:
    req = Request(request_id, text, list(ids), params, max_tokens, [first_seq], arrival_time or time.time())
    req.final_only = final_only
    req.plain_greedy = params.is_plain_greedy()
    req.overlappable = params.can_overlap()
    return req


def new_sequence(seq_id: int, index: int, ids: list[int], params: SamplingParams, tokenizer,
                 device: torch.device) -> Sequence:
    seq = Sequence(seq_id, index, ids)
    if params.detokenize and not params.use_beam_search:
        seq.detokenizer = IncrementalDetokenizer(tokenizer, ids, params.skip_special_tokens)
    if params.logprobs is not None:
        seq.logprobs = []
    seed_sequence(seq, params, device)
    return seq


def seed_sequence(seq: Sequence, params: SamplingParams, device: torch.device) -> None:
    """A per-request seed gives each output stream its own generator (seed + its index)."""
    if params.seed is not None:
        seq.generator = torch.Generator(device=device).manual_seed((params.seed + seq.index) % 2**63)
