"""The engine side of speculative decoding: who gets drafts this step, and what a verify row yields.

Before scheduling, `propose` gives each eligible decoding sequence up to k guesses (`seq.spec_tokens`);
the scheduler verifies them in the same forward when budget and blocks allow (else drops them), as a
k + 1-token causal chunk over the paged cache. After the forward, `verify` keeps a prefix of the drafts
(rejection.py), appends the kept tokens and the one after them through the normal per-token path (stop
checks, detokenization, logprobs, `max_tokens`), counts the kept drafts as computed and gives back the
blocks of the rejected ones. Requests that speculation cannot honour (beam search, structured outputs)
decode one token a step in the same batch.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from pagedserve.engine.block_manager import BlockManager
from pagedserve.engine.sampling import logprob_rows
from pagedserve.engine.scheduler import ScheduledSeq
from pagedserve.engine.sequence import Request, Sequence, Status
from pagedserve.engine.spec_decode.config import SpeculativeConfig
from pagedserve.engine.spec_decode.metrics import SpecDecodingStats
from pagedserve.engine.spec_decode.proposer import Proposer
from pagedserve.engine.spec_decode.rejection import VerifyRow, verify
from pagedserve.model.sampler import SampleResult, SampleRow


def speculable(req: Request) -> bool:
    """Can this request's tokens come from drafts? (Beams and grammars decode one token a step.)"""
    return req.status == Status.RUNNING and req.params.can_speculate() and (req.forked or req.num_slots == 1)


class Speculator:
    def __init__(self, config: SpeculativeConfig, proposer: Proposer, block_manager: BlockManager,
                 eos_token_ids: set[int], max_model_len: int, generator: torch.Generator):
        self.config = config
        self.proposer = proposer
        self.block_manager = block_manager
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.generator = generator
        self.stats = SpecDecodingStats()
        self._drafted: list[Sequence] = []
        self._known: set[int] = set()  # sequences the proposer may hold state for

    def propose(self, running: list[Request], num_unfinished: int) -> None:
        """Set `spec_tokens` on the decoding sequences that get drafts this step."""
        self.clear()
        cfg = self.config
        if cfg.disable_by_batch_size is not None and num_unfinished >= cfg.disable_by_batch_size:
            return
        seqs, ks = [], []
        for req in running:
            if not speculable(req):
                continue
            for seq in req.live_seqs:
                if seq.num_tokens - seq.num_computed != 1 or not seq.block_table:
                    continue  # still prefilling
                k = min(cfg.num_speculative_tokens, req.max_tokens - seq.num_output_tokens - 1,
                        self.max_model_len - seq.num_tokens)
                if k >= 1:
                    seqs.append(seq)
                    ks.append(k)
        live = {s.seq_id for s in seqs}
        gone = self._known - live
        if gone and len(gone) > len(live):  # forget finished sequences' histories now and then
            self.proposer.release(gone)
            self._known -= gone
        self._known |= live
        if not seqs:
            return
        drafts = self.proposer.propose(seqs, ks)
        for i, seq in enumerate(seqs):
            seq.spec_tokens = drafts.tokens[i]
            seq.spec_probs = drafts.probs[i] if drafts.probs else None
            if seq.spec_tokens:
                self._drafted.append(seq)

    def clear(self) -> None:
        """Drop this step's drafts (verified or not scheduled)."""
        for seq in self._drafted:
            seq.spec_tokens = []
            seq.spec_probs = None
        self._drafted = []

    def verify(self, logits: torch.Tensor, sampled: list[ScheduledSeq], now: float, touched: dict[str, Request],
               guarded: Callable, append: Callable) -> tuple[torch.Tensor, list[ScheduledSeq]]:
        """Handle the verify rows; return the logits and entries of the other sampled rows."""
        n = len(sampled)
        specs, entries, rows, other = [], [], [], []
        extra = n
        for i, e in enumerate(sampled):
            if not e.num_spec:
                other.append(i)
                continue
            k = e.num_spec
            rows.append(i)
            rows.extend(range(extra, extra + k))
            extra += k
            specs.append(self._verify_row(e.request, e.seq, k))
            entries.append(e)
        if not specs:
            return logits, sampled
        sub = logits[torch.tensor(rows, device=logits.device)]
        emitted = verify(sub, specs, self.generator)
        lps = self._logprobs(sub, specs, entries, emitted)
        for j, (e, toks) in enumerate(zip(entries, emitted)):
            req, seq = e.request, e.seq
            self.stats.record(e.num_spec, len(toks) - 1)
            for t, tok in enumerate(toks):
                info, slp = lps[j][t] if lps[j] is not None else (None, None)
                guarded(req, append, req, seq, tok, info, slp, now)
                if seq.finished or req.finished:
                    break
                if t < len(toks) - 1:
                    seq.num_computed += 1  # a kept draft: its K/V are in the cache
            if not seq.finished and seq.block_table:
                self.block_manager.trim(seq)
            touched[req.request_id] = req
        self.stats.maybe_log()
        if not other:
            return logits[:0], []
        return logits[torch.tensor(other, device=logits.device)], [sampled[i] for i in other]

    def _verify_row(self, req: Request, seq: Sequence, k: int) -> VerifyRow:
        p, drafts = req.params, seq.spec_tokens[:k]
        out = seq.output_token_ids
        blocked = sorted((set() if p.ignore_eos else self.eos_token_ids) | set(p.stop_token_ids))
        rows = [SampleRow(p, req.prompt_token_ids, out + drafts[:j], seq.generator,
                          blocked if len(out) + j < p.min_tokens else []) for j in range(k + 1)]
        q = seq.spec_probs[:k] if seq.spec_probs is not None else None
        return VerifyRow(rows, drafts, q, seq.generator)

    def _logprobs(self, sub: torch.Tensor, specs: list[VerifyRow], entries: list[ScheduledSeq],
                  emitted: list[list[int]]) -> list[list | None]:
        """Per verify row, (logprob info, sampled logprob) of each emitted token, where the request asks."""
        out: list[list | None] = [None] * len(specs)
        o = 0
        for j, (s, e, toks) in enumerate(zip(specs, entries, emitted)):
            if e.request.params.logprobs is not None:
                lp = torch.log_softmax(sub[o:o + len(toks)], dim=-1)
                res = SampleResult(toks, lp, lp.gather(1, torch.tensor(toks, device=lp.device)[:, None])
                                   .squeeze(1).tolist())
                infos = logprob_rows(res, s.rows[:len(toks)])
                out[j] = list(zip(infos, res.sampled_logprobs))
            o += len(s.rows)
        return out


def make_proposer(config: SpeculativeConfig, vocab_size: int) -> Proposer:
    if config.method == "ngram":
        from pagedserve.engine.spec_decode.ngram import NgramProposer

        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    from pagedserve.errors import ConfigError

    raise ConfigError(f"speculative_config: method {config.method!r} is not available yet",
                      param="speculative_config", hint='use "method": "ngram"')
