"""Gemma 2 end to end on the Triton attention kernels (compiled on CUDA, Triton's interpreter elsewhere):
the window and soft-cap paths of the prefill and decode kernels, inside the model, give HF's tokens and
logits with the prompt prefilled in chunks that split the window."""
from __future__ import annotations

import torch

from pagedserve import LLM
from tests.model.test_models_gemma2 import BLOCK, GREEDY, _hf, _prompt, gemma  # noqa: F401 (fixture)
from tests.tiny_models import LogitTap
from tests.triton_interp import import_kernels, interpreter_fixture, subprocess_test

TA, _NEEDS_SUBPROCESS = import_kernels("pagedserve.model.kernels.triton_attention", lambda m: m._INTERPRETED)
_interpret = interpreter_fixture(_NEEDS_SUBPROCESS)
test_in_subprocess = subprocess_test(__file__, _NEEDS_SUBPROCESS)


def test_triton_backend_matches_hf(gemma):  # noqa: F811
    model, path = gemma
    prompt = _prompt()
    ref_tokens, ref_logits = _hf(model, prompt)
    llm = LLM(model=str(path), attention_backend="triton", dtype="float32", block_size=BLOCK, max_model_len=128,
              num_kv_blocks=64, max_num_batched_tokens=12)
    assert isinstance(llm.engine.model.layers[0].self_attn.backend, TA.TritonAttentionBackend)
    tap = LogitTap(llm.engine)
    assert llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == ref_tokens
    got = torch.stack([r[3] for r in tap.rows]).cpu()
    torch.testing.assert_close(got, ref_logits.float(), atol=2e-3, rtol=1e-3)
