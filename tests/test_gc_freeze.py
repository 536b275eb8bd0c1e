"""Start-up objects are frozen out of the garbage collector, so no full collection over them lands inside
a step (a full pass over the default model's start-up heap took ~160 ms on a CI core)."""
from __future__ import annotations

import gc
import weakref

from pagedserve import LLM
from tests.tiny_models import build_hf, save


def test_engine_start_freezes_startup_objects(llm):
    assert gc.get_freeze_count() > 10_000  # torch, transformers, the tokenizer, the model


def test_a_later_engine_reclaims_a_dropped_engines_cycles(tmp_path):
    """The frozen generation is unfrozen before each start-up collection: an engine dropped while caught
    in a reference cycle is reclaimed when the next one starts, not kept for the life of the process."""
    d = save(build_hf("llama"), tmp_path / "tiny")
    opts = dict(model=str(d), num_kv_blocks=32, max_model_len=128)
    first = LLM(**opts)
    first.engine.owner = first  # a cycle through objects frozen at the first start-up
    gone = weakref.ref(first.engine)
    del first
    LLM(**opts)
    assert gone() is None
