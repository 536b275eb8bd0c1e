"""Turn a batch of logits into next tokens, one row per sequence.

Rows are processed together where settings allow (one softmax, one top-k
sort); per-row generators make seeded requests reproducible whatever else is in
the batch. Sampling uses the exponential race (argmax p/q, q ~ Exp(1)), which
draws exactly one random vector per row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedserve.sampling_params import SamplingParams


@dataclass
class SampleRow:
    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None  # None: use the engine's generator
    block_ids: list[int]  # token ids forbidden this step (EOS/stop before min_tokens)


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: torch.Tensor | None  # [S, V] raw log-softmax, only when some row asked
    sampled_logprobs: list[float] | None


def _on(device: torch.device, data, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small host list as a tensor on `device` without waiting for the GPU: `torch.tensor(..., device=cuda)`
    synchronises the stream, which would stall the overlapped step behind the forward pass in flight."""
    return torch.tensor(data, dtype=dtype).to(device, non_blocking=True)


def apply_penalties(logits: torch.Tensor, rows: list[SampleRow]) -> None:
    """In place. Repetition (HF semantics, prompt + output) and OpenAI presence/frequency (output)."""
    for i, r in enumerate(rows):
        p = r.params
        if p.repetition_penalty != 1.0:
            ids = torch.tensor(list(set(r.prompt_ids) | set(r.output_ids)), dtype=torch.long, device=logits.device)
            vals = logits[i, ids]
            logits[i, ids] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and r.output_ids:
            ids, counts = torch.tensor(r.output_ids, device=logits.device).unique(return_counts=True)
            logits[i, ids] -= p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty


def _top_k_top_p_min_p(probs: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """Zero out probabilities outside each row's top-k / nucleus / min-p set."""
    v = probs.shape[1]
    top_k = _on(probs.device, [r.params.top_k if r.params.top_k > 0 else v for r in rows])
    top_p = _on(probs.device, [r.params.top_p for r in rows], probs.dtype)
    min_p = _on(probs.device, [r.params.min_p for r in rows], probs.dtype)
    # Decided from the parameters on the host: a check on the tensors would wait for the GPU.
    if any(r.params.min_p > 0 for r in rows):
        probs = probs.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
    if any(0 < r.params.top_k < v or r.params.top_p < 1 for r in rows):
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        ranks = torch.arange(v, device=probs.device)[None, :]
        keep = ranks < top_k[:, None]
        cum = sorted_p.cumsum(dim=-1)
        keep &= (cum - sorted_p) < top_p[:, None]  # keep tokens until the mass before them reaches top_p
        keep[:, 0] = True
        sorted_p = sorted_p.masked_fill(~keep, 0.0)
        probs = torch.zeros_like(probs).scatter_(1, idx, sorted_p)
    return probs


def sample(logits: torch.Tensor, rows: list[SampleRow], generator: torch.Generator | None,
           need_logprobs: bool) -> SampleResult:
    """logits [S, V] float32 -> next token per row (+ raw logprobs when asked), read back to the host."""
    logprobs = torch.log_softmax(logits, dim=-1) if need_logprobs else None
    tokens = sample_tokens(logits, rows, generator)
    token_list = tokens.tolist()
    sampled = None
    if logprobs is not None:
        sampled = logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
    return SampleResult(token_list, logprobs, sampled)


def adjusted_logits(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """Logits after penalties, logit bias and blocked ids (a copy when any applies)."""
    if any(r.params.repetition_penalty != 1.0 or r.params.presence_penalty or r.params.frequency_penalty
           or r.block_ids or r.params.logit_bias for r in rows):
        logits = logits.clone()
        apply_penalties(logits, rows)
        for i, r in enumerate(rows):
            if r.params.logit_bias:
                bias = r.params.logit_bias
                ids = _on(logits.device, list(bias), torch.long)
                logits[i, ids] += _on(logits.device, list(bias.values()), logits.dtype)
            if r.block_ids:
                logits[i, r.block_ids] = float("-inf")
    return logits


def target_probs(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """The distribution each (non-greedy) row samples from: temperature, then top-k / top-p / min-p.
    Speculative verification needs it explicitly; `sample_tokens` draws from the same one."""
    temps = _on(logits.device, [r.params.temperature for r in rows], logits.dtype)
    probs = torch.softmax(logits / temps[:, None], dim=-1)
    return _top_k_top_p_min_p(probs, rows)


def sample_tokens(logits: torch.Tensor, rows: list[SampleRow], generator: torch.Generator | None) -> torch.Tensor:
    """The next token of every row as a tensor on the logits' device: no host synchronisation, so the
    overlapped step can feed it to the next forward pass before the host has seen it."""
    logits = adjusted_logits(logits, rows)
    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    if not random_rows:
        return logits.argmax(dim=-1)
    tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    if greedy:
        idx = _on(logits.device, greedy)
        tokens[idx] = logits[idx].argmax(dim=-1)
    if random_rows:
        idx = _on(logits.device, random_rows)
        sub = [rows[i] for i in random_rows]
        probs = target_probs(logits[idx], sub)
        q = torch.empty_like(probs)
        seeded = [j for j, r in enumerate(sub) if r.generator is not None]
        if len(seeded) < len(sub):  # one draw for all rows; seeded rows are then redrawn from their own
            q.exponential_(generator=generator)
        for j in seeded:
            q[j].exponential_(generator=sub[j].generator)
        tokens[idx] = (probs / q).argmax(dim=-1)
    return tokens
