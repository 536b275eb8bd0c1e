"""The engine side of sampling: which rows of a step's logits are sampled how, and with what.

The model-side sampler (`pagedserve/model/sampler.py`) turns logits and `SampleRow`s into tokens;
this module builds those rows (forking the n>1 siblings on their first token), sends plain greedy
rows down one argmax, batches the rest into one `sample` call, falls back to request-by-request
sampling when the batch raises (so only the culprit fails), and packs logprobs in one transfer.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pagedserve.engine.block_manager import BlockManager
from pagedserve.engine.request_intake import seed_sequence
from pagedserve.engine.scheduler import ScheduledSeq
from pagedserve.engine.sequence import Request, Sequence
from pagedserve.model.sampler import SampleResult, SampleRow, sample

LogprobInfo = tuple[list[int], list[float], int]  # top-k ids, their logprobs, the sampled token's rank


@dataclass
class StepRows:
    """One step's sampled positions, split by how they are decoded."""
    plain_rows: list[int] = field(default_factory=list)  # greedy, nothing else to apply: one argmax for all
    plain_seqs: list[tuple[Request, Sequence]] = field(default_factory=list)
    rows: list[SampleRow] = field(default_factory=list)  # everything else: one batched `sample`
    row_seqs: list[tuple[Request, Sequence]] = field(default_factory=list)
    row_src: list[int] = field(default_factory=list)  # each row's row in the logits (n>1 siblings share one)
    beams: dict[str, list[tuple[Sequence, int]]] = field(default_factory=dict)  # request id -> (beam, logits row)


class StepSampler:
    def __init__(self, block_manager: BlockManager, eos_token_ids: set[int], device: torch.device,
                 seq_ids: itertools.count, generator: torch.Generator):
        self.block_manager = block_manager
        self.eos_token_ids = eos_token_ids
        self.device = device
        self.seq_ids = seq_ids  # the engine's sequence-id counter, shared
        self.generator = generator  # for requests without a seed of their own

    def split(self, sampled: list[ScheduledSeq], guarded: Callable) -> StepRows:
        """Sort the step's sampled sequences into plain greedy, sampled and beam-search rows."""
        out = StepRows()
        for i, e in enumerate(sampled):
            req, seq = e.request, e.seq
            if seq.finished:
                continue  # stopped by a token the engine just read back (an overlapped step): row unused
            if req.plain_greedy and seq.num_output_tokens >= req.params.min_tokens:
                out.plain_rows.append(i)
                out.plain_seqs.append((req, seq))
                continue
            if req.params.use_beam_search:
                out.beams.setdefault(req.request_id, []).append((seq, i))
                continue
            built = guarded(req, self.rows_for, req, seq)
            for s, row in built or ():
                out.rows.append(row)
                out.row_seqs.append((req, s))
                out.row_src.append(i)
        return out

    def rows_for(self, req: Request, seq: Sequence) -> list[tuple[Sequence, SampleRow]]:
        targets = [seq]
        if req.num_slots > 1 and not req.forked:
            targets += self.fork(req, seq, req.params.n - 1)
        return [(s, self.sample_row(req, s)) for s in targets]

    def fork(self, req: Request, parent: Sequence, count: int) -> list[Sequence]:
        children = []
        for k in range(count):
            child = parent.fork(next(self.seq_ids), len(req.seqs))
            self.block_manager.fork(parent, child)
            seed_sequence(child, req.params, self.device)
            req.seqs.append(child)
            children.append(child)
        req.forked = True
        return children

    def sample_row(self, req: Request, seq: Sequence) -> SampleRow:
        p = req.params
        block = []
        if seq.num_output_tokens < p.min_tokens:
            block = sorted((set() if p.ignore_eos else self.eos_token_ids) | set(p.stop_token_ids))
        return SampleRow(p, req.prompt_token_ids, seq.output_token_ids, seq.generator, block)

    def greedy_and_append(self, logits: torch.Tensor, step: StepRows, now: float, touched: dict[str, Request],
                          guarded: Callable, append: Callable) -> None:
        """The plain greedy rows: one argmax over all of them, one transfer."""
        plain = logits if len(step.plain_rows) == logits.shape[0] else logits[step.plain_rows]
        for (req, seq), tok in zip(step.plain_seqs, plain.argmax(dim=-1).tolist()):
            guarded(req, append, req, seq, tok, None, None, now)
            touched[req.request_id] = req

    def sample_and_append(self, logits: torch.Tensor, step: StepRows, now: float, touched: dict[str, Request],
                          guarded: Callable, append: Callable) -> None:
        """Sample all rows in one batch; if that raises, again request by request so only the culprit fails.

        Each token goes to `append(req, seq, token, logprob info, sampled logprob, now)` under `guarded`."""
        rows, row_seqs, row_src = step.rows, step.row_seqs, step.row_src
        try:
            groups = [(None, list(range(len(rows))), self.sample_rows(logits, rows, row_src))]
        except Exception:  # noqa: BLE001
            by_req: dict[str, list[int]] = {}
            for j, (req, _) in enumerate(row_seqs):
                by_req.setdefault(req.request_id, []).append(j)
            groups = []
            for js in by_req.values():
                req = row_seqs[js[0]][0]
                sub = [rows[j] for j in js]
                res = guarded(req, self.sample_rows, logits, sub, [row_src[j] for j in js])
                if res is not None:
                    groups.append((req, js, res))
        for _, js, (res, lp_info) in groups:
            for k, j in enumerate(js):
                req, seq = row_seqs[j]
                slp = res.sampled_logprobs[k] if res.sampled_logprobs is not None else None
                guarded(req, append, req, seq, res.token_ids[k], lp_info[k] if lp_info else None, slp, now)
                touched[req.request_id] = req

    def sample_rows(self, logits: torch.Tensor, rows: list[SampleRow], src: list[int]
                    ) -> tuple[SampleResult, list[LogprobInfo] | None]:
        need_lp = any(r.params.logprobs is not None for r in rows)
        res = sample(logits[src], rows, self.generator, need_lp)
        return res, (logprob_rows(res, rows) if need_lp else None)


def logprob_rows(res: SampleResult, rows: list[SampleRow]) -> list[LogprobInfo]:
    """Per row: the top-k token ids and logprobs (k = the largest any row asked for) and the sampled
    token's rank, computed for all rows at once and read back in one transfer (not per row)."""
    lp = res.logprobs
    tok = torch.tensor(res.token_ids, device=lp.device)
    ranks = (lp > lp.gather(1, tok[:, None])).sum(dim=1) + 1
    k = max((r.params.logprobs or 0) for r in rows)
    if k:
        vals, idx = lp.topk(k, dim=-1)
        packed = torch.cat([ranks[:, None].to(lp.dtype), vals, idx.to(lp.dtype)], dim=1).tolist()
        # ids and ranks < 2^24 are exact in fp32; vocabularies are far smaller
        return [([int(t) for t in row[1 + k:]], row[1:1 + k], int(row[0])) for row in packed]
    return [([], [], r) for r in ranks.tolist()]
