"""Owns the model and the KV cache; turns one step's `InputBatch` into one forward pass.

The flat batch puts single-token rows (decodes) first and prefill chunks after,
the layout `AttentionMetadata` describes. Only the batch's logit rows (the rows
that sample) need logits, so the LM head runs on those rows alone. The runner
knows no scheduler: the engine fills the batch (engine/batch_builder.py).
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch
from torch import nn

from pagedserve.model.attention_metadata import AttentionMetadata
from pagedserve.model.input_batch import InputBatch

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

    def prepare(self, batch: InputBatch, prev_tokens: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """Device tensors for one step: input ids, positions, attention metadata and logit rows. Rows the
        batch names in `prev_dst` take their input from `prev_tokens`, the previous step's sampled tensor."""
        self._rows_out_of_order = batch.rows_out_of_order

        def tables(rows: list[list[int]]) -> torch.Tensor:  # padded [n, width]; numpy fills rows far faster
            if not rows:
                return self._tensor([[0]])
            arr = np.zeros((len(rows), max(len(bt) for bt in rows)), dtype=np.int32)
            for i, bt in enumerate(rows):
                arr[i, :len(bt)] = bt
            return torch.from_numpy(arr).to(self.device, non_blocking=True)

        d_lens, p_lens, q_start = batch.decode_seq_lens, batch.prefill_seq_lens, batch.prefill_query_start
        meta = AttentionMetadata(
            slot_mapping=self._tensor(batch.slot_mapping, torch.int64),
            num_decode=len(d_lens),
            decode_block_tables=tables(batch.decode_block_tables),
            decode_seq_lens=self._tensor(d_lens or [0]),
            prefill_query_start=self._tensor(q_start),
            prefill_seq_lens=self._tensor(p_lens or [0]),
            prefill_block_tables=tables(batch.prefill_block_tables),
            decode_max_seq_len=max(d_lens, default=0),
            prefill_query_start_list=tuple(q_start),
            prefill_seq_lens_list=tuple(p_lens),
            decode_seq_lens_list=tuple(d_lens),
            prompt_lens=self._prompt_lens(batch) if self.needs_prompt_lens else None,
            prefill_total_lens_list=tuple(batch.prefill_total_lens),
        )
        ids_t = self._tensor(batch.input_ids, torch.int64)
        if batch.prev_dst:
            if prev_tokens is None:
                raise ValueError("a row waits for a device token but no previous step's tokens were given")
            ids_t[self._tensor(batch.prev_dst, torch.int64)] = prev_tokens[self._tensor(batch.prev_src, torch.int64)]
        return ids_t, self._tensor(batch.positions, torch.int64), meta, self._tensor(batch.logit_rows, torch.int64)

    def _prompt_lens(self, batch: InputBatch) -> torch.Tensor:
        if batch.prompt_lens is None or len(batch.prompt_lens) != len(batch.input_ids):
            raise ValueError("this model reads each token's prompt length: the batch must carry prompt_lens")
        return self._tensor(batch.prompt_lens, torch.int64)

    @torch.inference_mode()
    def execute(self, batch: InputBatch, prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Run one step; return logits [S, V] (float32) of `batch.logit_rows`, in that order."""
        return self.run(*self.prepare(batch, prev_tokens))

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
