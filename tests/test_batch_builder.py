"""The runner's plain input batch: how the engine lays scheduled sequences out (engine/batch_builder.py),
how `InputBatch.prompts` lays fresh prompts out, and what the runner makes of a batch (no model needed
for the layout; a tiny model for the forward)."""
from __future__ import annotations

import pytest
import torch

from pagedserve.engine.batch_builder import build_input_batch
from pagedserve.engine.scheduler import ScheduledSeq
from pagedserve.model.input_batch import InputBatch
from pagedserve.model.layers.attention import get_attention_backend
from pagedserve.model.loader import iter_weights, read_hf_config
from pagedserve.model.model_args import ModelArgs
from pagedserve.model.registry import resolve_architecture
from pagedserve.model.runner import ModelRunner
from tests.engine_units import make_request
from tests.tiny_models import build_hf, save

BS = 4


def entry(prompt: list[int], computed: int, n: int, table: list[int], spec: list[int] = (), pending=None,
          extra: list[int] = ()) -> ScheduledSeq:
    req = make_request(f"r{prompt[0]}", prompt)
    seq = req.seqs[0]
    seq.token_ids.extend(extra)  # sampled tokens
    seq.num_computed, seq.block_table, seq.pending_row = computed, table, pending
    seq.spec_tokens = list(spec)
    return ScheduledSeq(seq, req, n, len(spec))


def test_decodes_first_then_prefill_chunks_and_only_sequence_ends_sample():
    chunk = entry([10, 11, 12, 13, 14, 15], 0, 3, [5, 6])  # a first chunk: computes, does not sample
    dec = entry([20, 21], 2, 1, [7], extra=[22])  # decoding its first sampled token
    last = entry([30, 31, 32, 33, 34], 4, 1, [8, 9])  # a one-token final chunk: a single-token row
    tail = entry([40, 41, 42, 43, 44], 2, 3, [1, 2])  # the final chunk of a prompt: samples
    batch, sampled = build_input_batch([chunk, dec, last, tail], BS, prompt_lens=True)
    assert batch.input_ids == [22, 34, 10, 11, 12, 42, 43, 44]
    assert batch.positions == [2, 4, 0, 1, 2, 2, 3, 4]
    assert batch.slot_mapping == [7 * 4 + 2, 9 * 4 + 0, 20, 21, 22, 4 + 2, 4 + 3, 8 + 0]
    assert batch.num_decode == 2 and batch.decode_seq_lens == [3, 5] and batch.decode_block_tables == [[7], [8, 9]]
    assert batch.prefill_seq_lens == [3, 5] and batch.prefill_query_start == [0, 3, 6]
    assert batch.prefill_block_tables == [[5, 6], [1, 2]]
    assert batch.logit_rows == [0, 1, 7] and not batch.rows_out_of_order
    assert sampled == [dec, last, tail]
    assert batch.prompt_lens == [2, 5, 6, 6, 6, 5, 5, 5]
    assert build_input_batch([chunk], BS)[0].prompt_lens is None


def test_verify_rows_put_drafts_after_every_sampled_row_and_pending_tokens_come_from_the_device():
    a = entry([1, 2, 3], 3, 3, [0, 3], spec=[8, 9], extra=[7], pending=1)  # last token + 2 drafts
    b = entry([4, 5], 2, 1, [1], extra=[6], pending=0)
    batch, sampled = build_input_batch([a, b], BS)
    assert batch.input_ids == [6, 7, 8, 9]
    assert batch.positions == [2, 3, 4, 5] and batch.slot_mapping == [6, 3, 12, 13]
    assert sampled == [b, a]
    assert batch.logit_rows == [0, 1, 2, 3] and batch.rows_out_of_order  # a's drafts follow every own row
    assert (batch.prev_dst, batch.prev_src) == ([0, 1], [0, 1])


def test_prompts_lays_out_fresh_prompts_like_the_engine():
    prompts, tables = [[1, 2, 3, 4, 5], [6], [7, 8]], [[3, 4], [5], [6]]
    batch = InputBatch.prompts(prompts, tables, BS, prompt_lens=True)
    scheduled = [entry(p, 0, len(p), t) for p, t in zip(prompts, tables)]
    want, _ = build_input_batch(scheduled, BS, prompt_lens=True)
    assert batch == want
    with pytest.raises(ValueError, match="one non-empty prompt per block table"):
        InputBatch.prompts([[1], []], [[0], [1]], BS)


def test_runner_forward_from_a_plain_batch_matches_the_models_own_pass(tmp_path):
    """`InputBatch.prompts` through the runner gives the logits of the model's plain (cache-free) forward."""
    hf = build_hf("llama")
    d = save(hf, tmp_path / "m")
    cfg = read_hf_config(d)
    args = ModelArgs.from_hf(cfg)
    model = resolve_architecture(cfg["architectures"], cfg)(args, get_attention_backend("auto", torch.device("cpu")),
                                                            max_len=64).float()
    model.load_hf_weights(iter_weights(d))
    model.eval()
    runner = ModelRunner(model, 8, BS, args.num_layers, model.args.num_kv_heads, args.head_dim, torch.float32,
                         torch.device("cpu"))
    prompts = [[5, 6, 7, 8, 9, 10], [11]]
    logits = runner.execute(InputBatch.prompts(prompts, [[0, 1], [2]], BS))
    with torch.inference_mode():
        ref = [hf(torch.tensor([p])).logits[0, -1].float() for p in (prompts[1], prompts[0])]  # single rows first
    torch.testing.assert_close(logits, torch.stack(ref), rtol=1e-4, atol=1e-4)
