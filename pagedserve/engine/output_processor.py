"""From a sampled token to what the caller sees: stop checks, detokenization, logprobs, outputs.

Apart from the step loop so the core stays about scheduling and batching: everything here is
per request and per token (the engine runs it under per-request isolation), and none of it
touches the model.
"""
from __future__ import annotations

from pagedserve.engine.block_manager import BlockManager
from pagedserve.engine.sampling import LogprobInfo
from pagedserve.engine.sequence import Request, Sequence
from pagedserve.outputs import CompletionOutput, Logprob, RequestOutput
from pagedserve.sampling_params import SamplingParams
from pagedserve.structured.manager import StructuredOutputManager


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: set[int], max_model_len: int, block_manager: BlockManager,
                 structured: StructuredOutputManager):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.block_manager = block_manager
        self.structured = structured

    def append_token(self, req: Request, seq: Sequence, token: int, lp_info: LogprobInfo | None,
                     slp: float | None, now: float) -> None:
        """Append `token` to `seq`; decide whether it finished (EOS, stop token/string, grammar, length)."""
        p = req.params
        grammar_done = p.structured_outputs is not None and self.structured.accept(req, seq, token)
        seq.token_ids.append(token)
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        req.metrics.last_token_time = now
        self.record_logprobs(seq, p.logprobs or 0, lp_info, token, slp)
        if token in self.eos_token_ids and not p.ignore_eos:
            seq.finish_reason = "stop"
        elif token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        else:
            if seq.detokenizer is not None:
                before = len(seq.output_text)
                seq.output_text += seq.detokenizer.step(token)
                if p.stop_list and seq.num_output_tokens >= p.min_tokens:
                    check_stop_strings(seq, p, before)
        if grammar_done and not seq.finished:
            seq.finish_reason = "stop"
        if not seq.finished and (seq.num_output_tokens >= req.max_tokens or seq.num_tokens >= self.max_model_len):
            seq.finish_reason = "length"
        if seq.finished:
            self.block_manager.free_seq(seq)

    def record_logprobs(self, seq: Sequence, k: int, info: LogprobInfo | None, token: int,
                        slp: float | None) -> None:
        if slp is not None:
            seq.cumulative_logprob += slp
        if seq.logprobs is None or info is None:
            return
        ids, vals, rank = info
        entry: dict[int, Logprob] = {}
        for r, (t, v) in enumerate(zip(ids[:k], vals[:k]), start=1):
            entry[t] = Logprob(v, r, self.tokenizer.decode([t]))
        if token not in entry:
            entry[token] = Logprob(float(slp), rank, self.tokenizer.decode([token]))
        seq.logprobs.append(entry)

    def make_output(self, req: Request) -> RequestOutput:
        """The request's state now, with the deltas since the last call (text held back while it may
        still turn out to start a stop string); beam search: the ranked hypotheses, once, at the end."""
        p = req.params
        if p.use_beam_search:
            best = sorted(req.beam_done, key=lambda h: h.score, reverse=True)[:p.n]
            outs = [CompletionOutput(i, self.tokenizer.decode(h.token_ids, skip_special_tokens=p.skip_special_tokens)
                                     if p.detokenize else "", h.token_ids, h.cumulative_logprob, None,
                                     h.finish_reason, h.stop_reason) for i, h in enumerate(best)]
            return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, True, req.metrics,
                                 req.seqs[0].num_cached_tokens if req.seqs else 0,
                                 [(o.text, o.token_ids) for o in outs])
        holdback = max((len(s) for s in p.stop_list), default=1) - 1
        outs, deltas = [], []
        for seq in req.seqs:
            text = seq.output_text
            visible = len(text) if seq.finished else max(seq.text_sent, len(text) - holdback)
            out_ids = seq.output_token_ids
            deltas.append((text[seq.text_sent:visible], out_ids[seq.tokens_sent:]))
            seq.text_sent, seq.tokens_sent = visible, len(out_ids)
            outs.append(CompletionOutput(seq.index, text[:visible], out_ids,
                                         seq.cumulative_logprob if seq.logprobs is not None else None,
                                         seq.logprobs, seq.finish_reason, seq.stop_reason))
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, req.finished, req.metrics,
                             req.seqs[0].num_cached_tokens, deltas)


def check_stop_strings(seq: Sequence, p: SamplingParams, before: int) -> None:
    """Finish `seq` at the earliest stop string that ends in text added since `before` (chars)."""
    text = seq.output_text
    longest = max(len(s) for s in p.stop_list)
    start = max(0, before - longest + 1)
    best = None
    for s in p.stop_list:
        i = text.find(s, start)
        if i != -1 and (best is None or i < best[0]):
            best = (i, s)
    if best is not None:
        i, s = best
        seq.output_text = text[:i + len(s)] if p.include_stop_str_in_output else text[:i]
        seq.finish_reason, seq.stop_reason = "stop", s
