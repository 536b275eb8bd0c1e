"""Start-up objects are frozen out of the garbage collector, so no full collection over them lands inside
a step (a full pass over the default model's start-up heap took ~160 ms on a CI core)."""
from __future__ import annotations

import gc


def test_engine_start_freezes_startup_objects(llm):
    assert gc.get_freeze_count() > 10_000  # torch, transformers, the tokenizer, the model
