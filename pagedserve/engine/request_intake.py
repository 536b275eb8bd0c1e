"""Everything `add_request` does before the scheduler sees a request: validate, tokenize, build.

Kept apart from the engine step so the refusals (each a one-line `InvalidRequestError` naming the
field, which the server turns into a 400) read in one place, in the order they are checked.
"""
from __future__ import annotations

import time
from collections.abc import Container

import torch

from pagedserve.config import EngineConfig
from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.engine.sequence import Request, Sequence
from pagedserve.errors import InvalidRequestError, PromptTooLongError
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


def check_prompt(ids: list[int], params: SamplingParams, vocab: int, max_model_len: int) -> int:
    """Refuse ids and params the model cannot take; returns max_tokens (default: the rest of the context)."""
    if not ids:
        raise InvalidRequestError("prompt: must contain at least one token", param="prompt")
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
        raise InvalidRequestError(f"prompt: token ids must be integers in [0, {vocab})", param="prompt")
    if any(t >= vocab for t in params.stop_token_ids):
        raise InvalidRequestError(f"stop_token_ids: token ids must be in [0, {vocab})", param="stop_token_ids")
    if params.top_k > vocab:
        raise InvalidRequestError(f"top_k: must be -1 or 0 (disabled) or in [1, {vocab}]", param="top_k")
    if params.logit_bias and max(params.logit_bias) >= vocab:
        raise InvalidRequestError(f"logit_bias: token ids must be in [0, {vocab})", param="logit_bias")
    n = len(ids)
    if n >= max_model_len:
        raise PromptTooLongError(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has {n} tokens "
            f"(at least one token must be left for the completion)", param="prompt")
    max_tokens = params.max_tokens
    if max_tokens is None:
        max_tokens = max_model_len - n
    elif n + max_tokens > max_model_len:
        raise PromptTooLongError(
            f"This model's maximum context length is {max_model_len} tokens, but {n + max_tokens} were "
            f"requested ({n} in the prompt, max_tokens={max_tokens} for the completion)", param="max_tokens")
    return max_tokens


def new_request(request_id: str, text: str | None, ids: list[int], params: SamplingParams, max_tokens: int,
                first_seq: Sequence, arrival_time: float | None, final_only: bool) -> Request:
    req = Request(request_id, text, list(ids), params, max_tokens, [first_seq], arrival_time or time.time())
    req.final_only = final_only
    req.plain_greedy = (params.greedy and req.num_slots == 1 and not params.use_beam_search
                        and params.logprobs is None and params.repetition_penalty == 1.0
                        and not params.logit_bias
                        and not params.presence_penalty and not params.frequency_penalty)
    return req


def check_capacity(req: Request, config: EngineConfig, max_num_batched_tokens: int, num_kv_blocks: int) -> None:
    """Refuse a request that could never be scheduled: too many slots, or more KV blocks than exist."""
    params, n = req.params, len(req.prompt_token_ids)
    bs = config.block_size
    need = -(-(n + req.max_tokens) // bs) * req.num_slots
    if req.num_slots > config.max_num_seqs:
        raise InvalidRequestError(f"n/beam_width={req.num_slots} exceeds max_num_seqs={config.max_num_seqs}",
                                  param="n")
    if params.use_beam_search and req.num_slots > max_num_batched_tokens:
        # All beams decode in the same step; a smaller budget could never schedule them together.
        raise InvalidRequestError(f"beam_width={req.num_slots} exceeds max_num_batched_tokens="
                                  f"{max_num_batched_tokens}", param="beam_width")
    if need > num_kv_blocks:
        raise InvalidRequestError(
            f"this request may need {need} KV blocks ({req.num_slots} x {n + req.max_tokens} tokens) but the "
            f"cache has {num_kv_blocks}", param="max_tokens", hint="lower max_tokens or n")


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
