"""The refusals a request meets against one engine's limits: one rule, called by the engine's
`add_request` and by the server before it submits (the server maps the error to a 400, nothing more).

Pure: no torch, no tokenizer, so the frontend process can import it without the engine.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from pagedserve.errors import InvalidRequestError, PromptTooLongError
from pagedserve.sampling_params import SamplingParams


@dataclass(frozen=True)
class EngineLimits:
    """What one loaded engine can take; the server learns it from the engine's ready message."""

    vocab_size: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    num_kv_blocks: int

    @classmethod
    def from_info(cls, info: dict) -> "EngineLimits":
        return cls(**{f.name: info[f.name] for f in fields(cls)})


def check_request(ids: list[int], params: SamplingParams, limits: EngineLimits, param: str = "prompt") -> int:
    """Refuse ids and params this engine cannot take; return max_tokens (default: the rest of the context).

    `param` names the field the prompt came from (the server's chat endpoint says `messages`)."""
    check_tokens(ids, params, limits.vocab_size, param)
    max_tokens = check_length(len(ids), params, limits.max_model_len, param)
    check_capacity(len(ids), max_tokens, params, limits)
    return max_tokens


def _is_token(t: object, vocab: int) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab


def check_tokens(ids: list[int], params: SamplingParams, vocab: int, param: str = "prompt") -> None:
    if not ids:
        raise InvalidRequestError(f"{param}: must contain at least one token", param=param)
    if not all(_is_token(t, vocab) for t in ids):
        raise InvalidRequestError(f"{param}: token ids must be integers in [0, {vocab})", param=param)
    if any(t >= vocab for t in params.stop_token_ids):
        raise InvalidRequestError(f"stop_token_ids: token ids must be integers in [0, {vocab})",
                                  param="stop_token_ids")
    if params.top_k > vocab:
        raise InvalidRequestError(f"top_k: must be -1 or 0 (disabled) or in [1, {vocab}], got {params.top_k}",
                                  param="top_k")
    if params.logit_bias and max(params.logit_bias) >= vocab:
        raise InvalidRequestError(f"logit_bias: token ids must be in [0, {vocab})", param="logit_bias")


def check_length(n: int, params: SamplingParams, max_model_len: int, param: str = "prompt") -> int:
    """The prompt of `n` tokens plus max_tokens must fit the context; returns max_tokens."""
    if n >= max_model_len:
        raise PromptTooLongError(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has {n} tokens "
            f"(at least one token must be left for the completion)", param=param)
    max_tokens = params.max_tokens
    if max_tokens is None:
        return max_model_len - n
    if n + max_tokens > max_model_len:
        raise PromptTooLongError(
            f"This model's maximum context length is {max_model_len} tokens, but {n + max_tokens} were "
            f"requested ({n} in the prompt, max_tokens={max_tokens} for the completion)", param="max_tokens",
            hint="lower max_tokens")
    return max_tokens


def check_capacity(n: int, max_tokens: int, params: SamplingParams, limits: EngineLimits) -> None:
    """Refuse a request that could never be scheduled: too many slots, or more KV blocks than exist."""
    slots = params.num_slots
    if slots > limits.max_num_seqs:
        raise InvalidRequestError(f"n/beam_width={slots} exceeds max_num_seqs={limits.max_num_seqs}", param="n")
    if params.use_beam_search and slots > limits.max_num_batched_tokens:
        # All beams decode in the same step; a smaller budget could never schedule them together.
        raise InvalidRequestError(f"beam_width={slots} exceeds max_num_batched_tokens="
                                  f"{limits.max_num_batched_tokens}", param="beam_width")
    need = -(-(n + max_tokens) // limits.block_size) * slots
    if need > limits.num_kv_blocks:
        raise InvalidRequestError(
            f"this request may need {need} KV blocks ({slots} x {n + max_tokens} tokens) but the cache has "
            f"{limits.num_kv_blocks}", param="max_tokens", hint="lower max_tokens or n")
