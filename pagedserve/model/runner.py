"""Owns the model and the KV cache; turns a scheduled step into one forward pass.

The flat batch puts single-token rows (decodes) first and prefill chunks after,
the layout `AttentionMetadata` describes. Only rows that reach the end of
their sequence need logits, so the LM head runs on those rows alone.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch
from torch import nn

from pagedserve.engine.scheduler import ScheduledSeq
from pagedserve.model.attention_metadata import AttentionMetadata

log = logging.getLogger(__name__)


class OneDNNLinear(nn.Module):
    """`nn.Linear` (inference only) through oneDNN with the weight packed once into its blocked layout.

    On CPU, fp32 `F.linear` goes to MKL's sgemm, which on AMD processors takes a slow generic path;
    oneDNN's packed fp32 GEMM ran the default model's projections 2-2.7x faster here (M=1..2048,
    EPYC, AVX-512) in the same fp32 arithmetic (results differ from MKL only in rounding order).
    The dense weight is released: `weight` stays as a meta-device placeholder (shape, dtype and
    parameter counts still right), the data lives in `packed`.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)
        self.weight = nn.Parameter(torch.empty(weight.shape, dtype=weight.dtype, device="meta"), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "OneDNNLinear":
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).contiguous()
        y = torch.ops.mkldnn._linear_pointwise(x2, self.packed, self.bias, "none", [], "")
        return y.view(*lead, self.out_features)


def onednn_linear_usable(dtype: torch.dtype, device: torch.device) -> bool:
    """CPU, fp32, oneDNN built in, not disabled (PAGEDSERVE_ONEDNN=0), and it gives F.linear's answer."""
    if device.type != "cpu" or dtype != torch.float32 or os.environ.get("PAGEDSERVE_ONEDNN", "1") == "0":
        return False
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        g = torch.Generator().manual_seed(0)
        w, b, x = torch.randn(24, 40, generator=g), torch.randn(24, generator=g), torch.randn(5, 40, generator=g)
        with torch.inference_mode():
            ok = torch.allclose(OneDNNLinear(w, b)(x), torch.nn.functional.linear(x, w, b), rtol=1e-4, atol=1e-5)
    except Exception as e:  # op missing from this torch build
        log.debug("oneDNN linear unavailable: %s", e)
        return False
    return ok


def use_onednn_linears(model: nn.Module) -> int:
    """Swap every nn.Linear of the model for a OneDNNLinear; a tied LM head (the embedding matrix,
    which the lookup still needs dense) gets a packed copy as `model.lm_head`. Returns how many."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Linear]
    with torch.no_grad():
        for parent, name, child in swaps:
            setattr(parent, name, OneDNNLinear.from_linear(child))
        n = len(swaps)
        embed = getattr(model, "embed_tokens", None)
        if getattr(model, "lm_head", False) is None and isinstance(embed, nn.Embedding):
            model.lm_head = OneDNNLinear(embed.weight)
            n += 1
    return n


class ModelRunner:
    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, num_layers: int,
                 num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 kv_dtype: torch.dtype | None = None):
        self.model = model
        self.block_size = block_size
        self.device = device
        if onednn_linear_usable(dtype, device):
            log.info("CPU linears through oneDNN (packed fp32 GEMM): %d layers", use_onednn_linears(model))
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        kv_dtype = kv_dtype or dtype  # float8_e4m3fn with --kv-cache-dtype fp8
        # Zeroed, not empty: masked-out slots are multiplied by 0 and must not hold NaN.
        self.kv_caches = [
            (torch.zeros(shape, dtype=kv_dtype, device=device), torch.zeros(shape, dtype=kv_dtype, device=device))
            for _ in range(num_layers)
        ]
        self.graphs = None  # DecodeGraphs once captured (CUDA only)
        self.needs_prompt_lens = getattr(model, "needs_prompt_lens", False)  # AttentionMetadata.prompt_lens
        self._rows_out_of_order = False  # set by `prepare`: the logits rows are not the flat rows in order

    def capture_decode_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        from pagedserve.model.cuda_graph import DecodeGraphs

        self.graphs = DecodeGraphs(self.model, self.kv_caches, max_num_seqs, max_model_len, self.block_size,
                                   self.device, self.needs_prompt_lens)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks src -> dst in every layer."""
        if not pairs:
            return
        src = self._tensor([s for s, _ in pairs], torch.int64)  # no stream sync: a step may be in flight
        dst = self._tensor([d for _, d in pairs], torch.int64)
        for k, v in self.kv_caches:
            if k.element_size() == 1:  # fp8: index kernels are not built for float8 everywhere; copy the bytes
                k, v = k.view(torch.uint8), v.view(torch.uint8)
            k[dst] = k[src]
            v[dst] = v[src]

    def _tensor(self, data, dtype=torch.int32) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype).to(self.device, non_blocking=True)

    def prepare(self, scheduled: list[ScheduledSeq], prev_tokens: torch.Tensor | None = None):
        """Flat inputs for one step. A sequence whose last token is still on the device (`pending_row`, set
        by the overlapped step) takes it from `prev_tokens`, the previous step's sampled tensor."""
        bs = self.block_size
        fix_dst: list[int] = []  # flat input positions filled from prev_tokens
        fix_src: list[int] = []
        decodes = [e for e in scheduled if e.num_tokens == 1]
        prefills = [e for e in scheduled if e.num_tokens > 1]
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logit_rows: list[int] = []
        sampled: list[ScheduledSeq] = []
        for i, e in enumerate(decodes):  # single-token rows: decodes, or a 1-token prefill chunk
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
        # With drafts the rows are out of flat order even when every token has one: always gather.
        self._rows_out_of_order = len(spec_rows) > 0 and len(sampled) > 1
        logit_rows += spec_rows

        def tables(entries):  # padded [n, width] block tables; numpy fills rows far faster than nested lists
            if not entries:
                return self._tensor([[0]])
            arr = np.zeros((len(entries), max(len(e.seq.block_table) for e in entries)), dtype=np.int32)
            for i, e in enumerate(entries):
                bt = e.seq.block_table
                arr[i, :len(bt)] = bt
            return torch.from_numpy(arr).to(self.device, non_blocking=True)

        d_lens = [e.seq.num_computed + 1 for e in decodes]
        p_lens = [e.seq.num_computed + e.num_tokens for e in prefills]
        q_start = [0]
        for e in prefills:
            q_start.append(q_start[-1] + e.num_tokens)
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots, torch.int64),
            num_decode=len(decodes),
            decode_block_tables=tables(decodes),
            decode_seq_lens=self._tensor(d_lens or [0]),
            prefill_query_start=self._tensor(q_start),
            prefill_seq_lens=self._tensor(p_lens or [0]),
            prefill_block_tables=tables(prefills),
            decode_max_seq_len=max(d_lens, default=0),
            prefill_query_start_list=tuple(q_start),
            prefill_seq_lens_list=tuple(p_lens),
            decode_seq_lens_list=tuple(d_lens),
            prompt_lens=self._prompt_lens(decodes, prefills) if self.needs_prompt_lens else None,
            prefill_total_lens_list=tuple(e.seq.num_tokens for e in prefills),
        )
        ids_t = self._tensor(input_ids, torch.int64)
        if fix_dst:
            assert prev_tokens is not None, "a sequence waits for a device token but no step is in flight"
            ids_t[self._tensor(fix_dst, torch.int64)] = prev_tokens[self._tensor(fix_src, torch.int64)]
        return (ids_t, self._tensor(positions, torch.int64), meta, self._tensor(logit_rows, torch.int64), sampled)

    def _prompt_lens(self, decodes: list[ScheduledSeq], prefills: list[ScheduledSeq]) -> torch.Tensor:
        """Each flat-batch token's request prompt length (decodes first, then the prefill chunks)."""
        lens = [e.seq.num_prompt_tokens for e in decodes]
        for e in prefills:
            lens.extend([e.seq.num_prompt_tokens] * e.num_tokens)
        return self._tensor(lens, torch.int64)

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq], prev_tokens: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, list[ScheduledSeq]]:
        """Run one step; return logits [S, V] (float32) for the rows that sample, and those rows. With
        speculative drafts, the drafts' rows follow (each verify row's drafts in `sampled` order)."""
        input_ids, positions, meta, logit_rows, sampled = self.prepare(scheduled, prev_tokens)
        return self.run(input_ids, positions, meta, logit_rows), sampled

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            logit_rows: torch.Tensor) -> torch.Tensor:
        """One forward over prepared inputs (tensor-parallel workers call this directly); logits of
        `logit_rows`, or an empty tensor when no row samples."""
        if (self.graphs is not None and meta.num_prefill == 0
                and self.graphs.can_run(meta.num_decode, meta.decode_block_tables.shape[1])):
            hidden = self.graphs.run(input_ids, positions, meta)
        else:
            hidden = self.model(input_ids, positions, self.kv_caches, meta)
        n = logit_rows.shape[0]
        if n == 0:
            return torch.empty(0)
        if n < hidden.shape[0] or self._rows_out_of_order:  # else every row samples, in order: no gather
            hidden = hidden[logit_rows]
        return self.model.compute_logits(hidden)
