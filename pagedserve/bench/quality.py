"""Model-quality measurements on a loaded engine: perplexity and greedy agreement with a reference.

Used by benchmarks/quant_quality.py and tests/quantization/test_quantization.py to measure what quantization
costs, instead of assuming it. Full-sequence logits come from one prefill forward over a private,
throw-away KV cache, so the engine's own cache (and its prefix-cache entries) is never touched.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pagedserve.model.input_batch import InputBatch


@torch.inference_mode()
def prefill_logits(engine, token_ids: list[int]) -> torch.Tensor:
    """fp32 logits [len(token_ids), vocab]: row i predicts token i + 1."""
    runner, n = engine.runner, len(token_ids)
    bs = runner.block_size
    blocks = -(-n // bs)
    batch = InputBatch.prompts([list(token_ids)], [list(range(blocks))], bs, prompt_lens=runner.needs_prompt_lens)
    input_ids, positions, meta, _ = runner.prepare(batch)
    k0 = runner.kv_caches[0][0]
    shape = (blocks, bs) + tuple(k0.shape[2:])
    caches = [(torch.zeros(shape, dtype=k0.dtype, device=k0.device), torch.zeros(shape, dtype=k0.dtype,
                                                                                 device=k0.device))
              for _ in runner.kv_caches]
    hidden = engine.model(input_ids, positions, caches, meta)
    return engine.model.compute_logits(hidden)


def perplexity(engine, token_ids: list[int], window: int = 1024) -> tuple[float, int]:
    """exp(mean NLL) over non-overlapping windows of `window` tokens (each window starts fresh).
    Returns (perplexity, number of predicted tokens)."""
    nll, count = 0.0, 0
    for s in range(0, len(token_ids) - 1, window):
        chunk = token_ids[s:s + window]
        if len(chunk) < 2:
            break
        logits = prefill_logits(engine, chunk)[:-1]
        target = torch.tensor(chunk[1:], device=logits.device)
        nll += F.cross_entropy(logits, target, reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(nll / count), count


def teacher_forced_agreement(engine, prompt: list[int], reference: list[int]) -> tuple[int, int]:
    """Feed prompt + the reference continuation; count positions where this engine's argmax equals the
    reference's next token. One early divergence does not cascade. Returns (agreeing, total)."""
    if not reference:
        return 0, 0
    logits = prefill_logits(engine, prompt + reference[:-1])[len(prompt) - 1:]
    pred = logits.argmax(-1).tolist()
    return sum(int(p == r) for p, r in zip(pred, reference)), len(reference)


def free_running_agreement(reference: list[int], output: list[int]) -> tuple[int, int]:
    """Positions where two free-running greedy outputs hold the same token (a missing token disagrees)."""
    return sum(int(a == b) for a, b in zip(reference, output)), max(len(reference), len(output))
