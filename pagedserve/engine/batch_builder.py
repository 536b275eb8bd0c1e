"""The scheduler's output as the runner's `InputBatch`: the one place that reads sequences for a forward.

Single-token rows (decodes, or one-token prefill chunks) go first and prefill chunks after, the layout
`AttentionMetadata` describes. Only rows that reach the end of their sequence sample; their entries come
back in logits-row order so the engine knows whose logits are whose. One pass over the scheduled
entries builds every list.
"""
from __future__ import annotations

from pagedserve.engine.scheduler import ScheduledSeq
from pagedserve.model.input_batch import InputBatch


def build_input_batch(scheduled: list[ScheduledSeq], block_size: int, prompt_lens: bool = False
                      ) -> tuple[InputBatch, list[ScheduledSeq]]:
    """This step's inputs, and the entries that sample in their logits-row order. A sequence whose last
    token is still on the device (`pending_row`, set by the overlapped step) takes it from the previous
    step's sampled tensor (`InputBatch.prev_dst`/`prev_src`). `prompt_lens`: fill the per-token prompt
    lengths (models that read them)."""
    bs = block_size
    fix_dst: list[int] = []
    fix_src: list[int] = []
    decodes = [e for e in scheduled if e.num_tokens == 1]
    prefills = [e for e in scheduled if e.num_tokens > 1]
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    logit_rows: list[int] = []
    sampled: list[ScheduledSeq] = []
    for i, e in enumerate(decodes):
        seq = e.seq
        s = seq.num_computed
        ids = seq.token_ids
        input_ids.append(ids[s])
        positions.append(s)
        slots.append(seq.block_table[s // bs] * bs + s % bs)
        if s + 1 == len(ids):
            logit_rows.append(i)
            sampled.append(e)
            if seq.pending_row is not None:
                fix_dst.append(i)
                fix_src.append(seq.pending_row)
    spec_rows: list[int] = []  # speculative drafts' rows, after every sampled row's own
    for e in prefills:
        seq, s, n = e.seq, e.seq.num_computed, e.num_tokens
        input_ids.extend(seq.token_ids[s:s + n - e.num_spec])
        if e.num_spec:  # a verify row: the last token, then the drafts (a causal chunk)
            input_ids.extend(seq.spec_tokens[:e.num_spec])
        positions.extend(range(s, s + n))
        bt = seq.block_table
        slots.extend(bt[p // bs] * bs + p % bs for p in range(s, s + n))
        if s + n - e.num_spec == seq.num_tokens:
            last = len(input_ids) - 1 - e.num_spec
            logit_rows.append(last)
            spec_rows.extend(range(last + 1, len(input_ids)))
            sampled.append(e)
            if seq.pending_row is not None:
                fix_dst.append(last)
                fix_src.append(seq.pending_row)
    q_start = [0]
    for e in prefills:
        q_start.append(q_start[-1] + e.num_tokens)
    lens = None
    if prompt_lens:
        lens = [e.seq.num_prompt_tokens for e in decodes]
        for e in prefills:
            lens.extend([e.seq.num_prompt_tokens] * e.num_tokens)
    batch = InputBatch(
        input_ids, positions, slots,
        decode_block_tables=[e.seq.block_table for e in decodes],
        decode_seq_lens=[e.seq.num_computed + 1 for e in decodes],
        prefill_block_tables=[e.seq.block_table for e in prefills],
        prefill_seq_lens=[e.seq.num_computed + e.num_tokens for e in prefills],
        prefill_query_start=q_start,
        prefill_total_lens=[e.seq.num_tokens for e in prefills],
        logit_rows=logit_rows + spec_rows,
        # With drafts the rows are out of flat order even when every token has one: always gather.
        rows_out_of_order=len(spec_rows) > 0 and len(sampled) > 1,
        prev_dst=fix_dst, prev_src=fix_src, prompt_lens=lens)
    return batch, sampled
