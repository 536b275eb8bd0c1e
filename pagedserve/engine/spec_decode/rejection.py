"""Which drafts a verify forward keeps, and the token that follows them.

Greedy rows keep the longest prefix of drafts equal to the target's argmax and add the argmax after it
(the bonus token): the output is token for token what plain greedy decoding gives. Sampled rows use the
speculative rejection rule (Leviathan et al. 2023; Chen et al. 2023): draft d at position j is kept with
probability min(1, p_j(d) / q_j(d)); at the first rejection the token is drawn from max(0, p_j - q_j)
renormalised, and when all are kept one more is drawn from p_k. Every emitted token is then distributed
exactly as sampling from the target alone. Deterministic drafts (n-gram) have a one-hot q, so d is kept
with probability p_j(d) and the residual is p_j with d removed. Random numbers come from the sequence's
own generator when it has a seed, so seeded requests reproduce.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedserve.model.sampler import SampleRow, adjusted_logits, target_probs


@dataclass
class VerifyRow:
    """One sequence under verification: k drafts and the k + 1 sampling rows scoring them."""
    rows: list[SampleRow]  # row j: the distribution after the last token and drafts[:j]
    drafts: list[int]
    draft_probs: torch.Tensor | None  # [k, V] or None (deterministic drafts)
    generator: torch.Generator | None  # None: the engine's


def verify(logits: torch.Tensor, specs: list[VerifyRow], generator: torch.Generator | None) -> list[list[int]]:
    """logits [sum(k_i + 1), V], the rows of `specs` back to back -> per sequence the emitted tokens: the
    kept drafts, then one more (so between 1 and k + 1 tokens)."""
    flat = [r for s in specs for r in s.rows]
    adj = adjusted_logits(logits, flat)
    starts, o = [], 0
    for s in specs:
        starts.append(o)
        o += len(s.rows)
    out: list[list[int]] = [[] for _ in specs]
    greedy = [i for i, s in enumerate(specs) if s.rows[0].params.greedy]
    if greedy:
        top = adj.argmax(dim=-1).tolist()
        for i in greedy:
            t, d = top[starts[i]:starts[i] + len(specs[i].rows)], specs[i].drafts
            a = 0
            while a < len(d) and d[a] == t[a]:
                a += 1
            out[i] = t[:a + 1]
    rand = [i for i, s in enumerate(specs) if not s.rows[0].params.greedy]
    if rand:
        _rejection_sample(adj, specs, starts, rand, generator, out)
    return out


def _rejection_sample(adj: torch.Tensor, specs: list[VerifyRow], starts: list[int], rand: list[int],
                      generator: torch.Generator | None, out: list[list[int]]) -> None:
    """The sampled sequences, batched: one probability computation, one draw per generator, two reads."""
    dev = adj.device
    sub = [specs[i] for i in rand]
    ks = [len(s.drafts) for s in sub]
    kmax = max(ks)
    # Probabilities of every row of these sequences, then [S, kmax] views of the draft positions.
    row_idx = [starts[i] + j for i in rand for j in range(len(specs[i].rows))]
    probs = target_probs(adj[_on(dev, row_idx)], [r for s in sub for r in s.rows])
    first, o = [], 0
    for k in ks:
        first.append(o)
        o += k + 1
    first_t = _on(dev, first)
    pos = torch.arange(kmax, device=dev)
    k_t = _on(dev, ks)
    valid = pos[None, :] < k_t[:, None]
    drafts = _on(dev, [s.drafts + [0] * (kmax - len(s.drafts)) for s in sub])
    rows = first_t[:, None] + torch.minimum(pos[None, :], k_t[:, None])
    pd = probs[rows, drafts]  # p_j(d_j)
    qd = torch.ones_like(pd)
    for j, s in enumerate(sub):
        if s.draft_probs is not None:
            qd[j, :ks[j]] = s.draft_probs.gather(1, drafts[j, :ks[j], None]).squeeze(1)
    u = _uniform((len(sub), kmax), sub, generator, dev, probs.dtype)
    keep = (u * qd < pd) & valid  # kept with probability min(1, p/q)
    kept = keep.to(torch.int64).cumprod(dim=1).sum(dim=1)  # drafts kept before the first rejection
    dist = probs[first_t + kept].clone()
    rejected = kept < k_t
    at = torch.minimum(kept, k_t - 1).clamp(min=0)
    one_hot = [j for j, s in enumerate(sub) if s.draft_probs is None]
    if one_hot:  # the residual of a one-hot draft: the target without the drafted token
        oh = _on(dev, one_hot)
        mask = torch.zeros_like(dist, dtype=torch.bool)
        mask[oh, drafts[oh, at[oh]]] = True
        dist = dist.masked_fill(mask & rejected[:, None], 0.0)
    for j, s in enumerate(sub):
        if s.draft_probs is not None:
            res = (dist[j] - s.draft_probs[at[j]]).clamp(min=0.0)
            dist[j] = torch.where(rejected[j], res, dist[j])
    z = dist.sum(dim=-1, keepdim=True)
    dist = torch.where(z > 0, dist / z.clamp(min=1e-30), probs[first_t + kept])  # (0 only for float ties)
    race = _exponential(dist, sub, generator)
    tokens = (dist / race).argmax(dim=-1)
    counts, toks = kept.tolist(), tokens.tolist()
    for j, i in enumerate(rand):
        out[i] = specs[i].drafts[:counts[j]] + [toks[j]]


def _on(dev: torch.device, data) -> torch.Tensor:
    return torch.tensor(data, dtype=torch.long).to(dev, non_blocking=True)


def _uniform(shape, sub: list[VerifyRow], generator, dev, dtype) -> torch.Tensor:
    """One draw for all rows; seeded rows are then redrawn from their own generator (reproducible)."""
    u = torch.rand(shape, generator=generator, device=dev, dtype=dtype)
    for j, s in enumerate(sub):
        if s.generator is not None:
            u[j] = torch.rand(shape[1], generator=s.generator, device=dev, dtype=dtype)
    return u


def _exponential(dist: torch.Tensor, sub: list[VerifyRow], generator) -> torch.Tensor:
    race = torch.empty_like(dist).exponential_(generator=generator)
    for j, s in enumerate(sub):
        if s.generator is not None:
            race[j].exponential_(generator=s.generator)
    return race
