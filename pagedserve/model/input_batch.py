"""One step's inputs in the runner's terms: flat tokens, cache slots and block tables, no engine objects.

The engine fills it from the scheduler's output (`engine/batch_builder.py`); profiling and quality
measurements build one directly (`InputBatch.prompts`). The runner only turns these lists into device
tensors and `AttentionMetadata`, so the model layer never sees a scheduler or a sequence.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class InputBatch:
    # [T] flat: single-token rows (decodes) first, then each prefill chunk's tokens in order
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]  # the cache slot of every token
    decode_block_tables: list[list[int]]  # per single-token row
    decode_seq_lens: list[int]  # per single-token row: context length including its token
    prefill_block_tables: list[list[int]]  # per prefill chunk
    prefill_seq_lens: list[int]  # per prefill chunk: context length after it
    prefill_query_start: list[int]  # [P+1] offsets of the chunks into the prefill tokens, from 0
    # Flat rows whose logits are wanted: each sampling sequence's last token, then the speculative
    # drafts' rows (each verify row's drafts in the same order).
    logit_rows: list[int] = field(default_factory=list)
    rows_out_of_order: bool = False  # logit_rows are not 0..n-1 in order even if every row samples
    # Inputs still on the device (overlapped steps): flat row prev_dst[i] takes prev_tokens[prev_src[i]].
    prev_dst: list[int] = field(default_factory=list)
    prev_src: list[int] = field(default_factory=list)
    # [T] each token's request prompt length, for models that read `AttentionMetadata.prompt_lens`.
    prompt_lens: list[int] | None = None
    # [P] each prefill's sequence length once fully prefilled (LongRoPE picks its factors by it)
    prefill_total_lens: list[int] = field(default_factory=list)

    @property
    def num_decode(self) -> int:
        return len(self.decode_seq_lens)

    @classmethod
    def prompts(cls, prompts: list[list[int]], block_tables: list[list[int]], block_size: int,
                prompt_lens: bool = False) -> "InputBatch":
        """Whole prompts from position 0 (nothing cached), each sampling its last token. A one-token
        prompt is a single-token row, as the engine lays it out."""
        if len(prompts) != len(block_tables) or not all(prompts):
            raise ValueError("one non-empty prompt per block table")
        order = [i for i, p in enumerate(prompts) if len(p) == 1] + [i for i, p in enumerate(prompts) if len(p) > 1]
        b = cls([], [], [], [], [], [], [], [0], prompt_lens=[] if prompt_lens else None)
        for i in order:
            p, bt = prompts[i], block_tables[i]
            b.input_ids.extend(p)
            b.positions.extend(range(len(p)))
            b.slot_mapping.extend(bt[j // block_size] * block_size + j % block_size for j in range(len(p)))
            b.logit_rows.append(len(b.input_ids) - 1)
            if len(p) == 1:
                b.decode_block_tables.append(bt)
                b.decode_seq_lens.append(1)
            else:
                b.prefill_block_tables.append(bt)
                b.prefill_seq_lens.append(len(p))
                b.prefill_query_start.append(b.prefill_query_start[-1] + len(p))
                b.prefill_total_lens.append(len(p))
            if b.prompt_lens is not None:
                b.prompt_lens.extend([len(p)] * len(p))
        return b
