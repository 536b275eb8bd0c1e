"""CUDA graphs for decode steps: one launch replays a whole forward pass.

A decode step of a 7B model launches hundreds of small kernels; at small batch
sizes the CPU cannot issue them as fast as the GPU runs them. We capture the
model's forward once per batch size in `capture_sizes` into static input
buffers, then a real batch of n decodes copies its inputs into the first n rows
and replays the graph of the next size up. Padding rows write no KV (slot -1)
and attend over nothing (seq_len 0), so they cost little and change nothing.

Only the transformer runs in the graph; the LM head runs eagerly on the real
rows (so no [batch, vocab] buffer per captured size) and sampling stays outside.
The attention backend must not read sequence lengths on the host: the Triton
decode kernel's grid depends only on (batch, kv heads, splits), and the split
count is fixed at capture from `max_model_len`.
"""
from __future__ import annotations

import bisect
import logging
import time

import torch

from pagedserve.model.attention_metadata import AttentionMetadata

log = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(288, 513, 32))
    return [s for s in sizes if s <= max_num_seqs] or [1]


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list, max_num_seqs: int, max_model_len: int,
                 block_size: int, device: torch.device, prompt_lens: bool = False):
        self.sizes = capture_sizes(max_num_seqs)
        max_bs = self.sizes[-1]
        max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(max_bs, max_blocks, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(max_bs, dtype=torch.int32, device=device)
        # each row's prompt length, for models that read AttentionMetadata.prompt_lens
        self.prompt_lens = torch.zeros(max_bs, dtype=torch.int64, device=device) if prompt_lens else None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.max_model_len = max_model_len
        t0 = time.time()
        empty = torch.zeros(1, dtype=torch.int32, device=device)
        pool = None
        with torch.inference_mode():
            for bs in reversed(self.sizes):  # largest first: smaller graphs reuse its memory pool
                meta = AttentionMetadata(
                    slot_mapping=self.slot_mapping[:bs], num_decode=bs,
                    decode_block_tables=self.block_tables[:bs], decode_seq_lens=self.seq_lens[:bs],
                    prefill_query_start=empty, prefill_seq_lens=empty, prefill_block_tables=empty[None],
                    decode_max_seq_len=max_model_len, prefill_query_start_list=(0,), prefill_seq_lens_list=(),
                    prompt_lens=None if self.prompt_lens is None else self.prompt_lens[:bs])
                args = (self.input_ids[:bs], self.positions[:bs], kv_caches, meta)
                model(*args)  # warm-up: Triton autotuning/compilation happens outside the capture
                torch.cuda.synchronize(device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[bs] = model(*args)
                pool = graph.pool()
                self.graphs[bs] = graph
        torch.cuda.synchronize(device)
        log.info("captured CUDA graphs for decode batch sizes 1..%d (%d graphs) in %.1fs",
                 max_bs, len(self.sizes), time.time() - t0)

    def can_run(self, num_decodes: int, max_blocks: int) -> bool:
        return num_decodes <= self.sizes[-1] and max_blocks <= self.block_tables.shape[1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Replay the graph for a decode-only batch; returns hidden states [n, hidden]."""
        n = input_ids.shape[0]
        bs = self.sizes[bisect.bisect_left(self.sizes, n)]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:bs].fill_(-1)
        bt = meta.decode_block_tables
        self.block_tables[:n, :bt.shape[1]].copy_(bt)
        self.seq_lens[:n].copy_(meta.decode_seq_lens)
        self.seq_lens[n:bs].zero_()
        if self.prompt_lens is not None:
            self.prompt_lens[:n].copy_(meta.prompt_lens)
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
