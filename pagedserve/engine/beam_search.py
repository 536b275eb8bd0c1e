"""Beam search: one step of all of a request's beams at once.

Apart from the engine step because it is a different algorithm over the same logits: it ranks
continuations across beams, forks and prunes sequences (forks share KV blocks copy-on-write) and
collects finished hypotheses, where sampling appends one token per sequence.
"""
from __future__ import annotations

import itertools

import torch

from pagedserve.engine.block_manager import BlockManager
from pagedserve.engine.sequence import BeamHypothesis, Request, Sequence
from pagedserve.sampling_params import SamplingParams


class BeamSearch:
    def __init__(self, block_manager: BlockManager, eos_token_ids: set[int], max_model_len: int,
                 seq_ids: itertools.count):
        self.block_manager = block_manager
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.seq_ids = seq_ids  # the engine's sequence-id counter, shared

    def step(self, req: Request, entries: list[tuple[Sequence, int]], logits: torch.Tensor, now: float) -> bool:
        """Keep the beam_width best continuations over all live beams; forks share blocks (CoW).

        `entries`: (beam, its row in `logits`). True when the search is over: the caller finishes `req`."""
        p = req.params
        width = p.beam_width
        live = req.live_seqs
        got = {s.seq_id for s, _ in entries}
        if got != {s.seq_id for s in live}:
            # Some beams did not finish recomputing this step: redo their last token next step.
            for s, _ in entries:
                s.num_computed -= 1
            return False
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        rows = torch.stack([logits[i] for _, i in entries])
        lps = torch.log_softmax(rows, dim=-1)
        out_len = live[0].num_output_tokens
        stop_ids = (set() if p.ignore_eos else set(self.eos_token_ids)) | set(p.stop_token_ids)
        if out_len < p.min_tokens and stop_ids:
            lps[:, sorted(stop_ids)] = float("-inf")
        cum = torch.tensor([s.cumulative_logprob for s, _ in entries], device=lps.device)
        scores = (cum[:, None] + lps).flatten()
        top = scores.topk(min(2 * width, scores.numel()))
        vocab = lps.shape[1]
        chosen: list[tuple[int, int, float]] = []  # (beam index, token, cumulative logprob)
        for score, flat in zip(top.values.tolist(), top.indices.tolist()):
            b, tok = divmod(flat, vocab)
            if tok in stop_ids:
                seq = entries[b][0]
                ids = seq.output_token_ids + [tok]
                req.beam_done.append(BeamHypothesis(ids, score, beam_score(score, len(ids), p), "stop",
                                                    tok if tok in p.stop_token_ids else None))
            else:
                chosen.append((b, tok, score))
            if len(chosen) == width:
                break
        children: dict[int, list[tuple[int, float]]] = {}
        for b, tok, score in chosen:
            children.setdefault(b, []).append((tok, score))
        new_seqs: list[Sequence] = []
        for b, (seq, _) in enumerate(entries):
            kids = children.get(b)
            if not kids:
                seq.finish_reason = "pruned"
                self.block_manager.free_seq(seq)
                continue
            for tok, score in kids[1:]:
                child = seq.fork(next(self.seq_ids), 0)
                self.block_manager.fork(seq, child)
                child.token_ids.append(tok)
                child.cumulative_logprob = score
                new_seqs.append(child)
            seq.token_ids.append(kids[0][0])
            seq.cumulative_logprob = kids[0][1]
            new_seqs.append(seq)
        req.seqs = new_seqs
        req.forked = True
        n_out = out_len + 1
        if not new_seqs:
            return True
        hit_length = n_out >= req.max_tokens or new_seqs[0].num_tokens >= self.max_model_len
        done = sorted(req.beam_done, key=lambda h: h.score, reverse=True)
        best_live = max(s.cumulative_logprob for s in new_seqs)
        enough = len(done) >= width and done[width - 1].score >= beam_score(best_live, n_out, p)
        if hit_length or enough:
            if hit_length:
                for s in new_seqs:
                    ids = s.output_token_ids
                    req.beam_done.append(BeamHypothesis(ids, s.cumulative_logprob,
                                                        beam_score(s.cumulative_logprob, len(ids), p), "length"))
            for s in new_seqs:
                s.finish_reason = "pruned"
                self.block_manager.free_seq(s)
            return True
        return False


def beam_score(cum: float, length: int, p: SamplingParams) -> float:
    """A hypothesis's rank: cumulative logprob over length ** length_penalty."""
    try:
        return cum / (max(length, 1) ** p.length_penalty)
    except (OverflowError, ZeroDivisionError):  # out-of-range penalties are refused; stay total anyway
        return float("-inf")
