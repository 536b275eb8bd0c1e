"""What one step's flat batch looks like to attention: the layout every backend reads.

Its own module so that the backends (attention.py, triton_attention.py), the model, the runner
and CUDA graphs all import it without importing each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64, the cache slot of every token in the flat batch
    num_decode: int  # the first num_decode tokens are single-token decodes, one per sequence
    decode_block_tables: torch.Tensor  # [num_decode, max_blocks] int32, padded with 0
    decode_seq_lens: torch.Tensor  # [num_decode] int32, context length including the new token
    prefill_query_start: torch.Tensor  # [P+1] int32, offsets into the prefill tokens (starting at 0)
    prefill_seq_lens: torch.Tensor  # [P] int32, context length after this chunk
    prefill_block_tables: torch.Tensor  # [P, max_blocks] int32
    # Host copies (python ints) so the CPU path never syncs to read shapes.
    decode_max_seq_len: int = 0
    prefill_query_start_list: tuple[int, ...] = (0,)
    prefill_seq_lens_list: tuple[int, ...] = ()
    decode_seq_lens_list: tuple[int, ...] = ()  # host copy of decode_seq_lens (optional: enables grouping)
    # [T] int64: each token's request prompt length, for models that set `needs_prompt_lens` (Qwen's
    # dynamic NTK picks a RoPE base per request from it); None for the others.
    prompt_lens: torch.Tensor | None = None
    prefill_total_lens_list: tuple[int, ...] = ()  # each prefill's sequence length once fully prefilled (LongRoPE)
    # Tensors derived from the fields above once per step (by the first layer that needs them) and
    # reused by every other layer: the block tables and lengths are the same for all of them.
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_prefill(self) -> int:
        return len(self.prefill_seq_lens_list)
