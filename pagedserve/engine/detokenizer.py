"""Incremental detokenization that never emits a broken UTF-8 character.

Decoding one token at a time loses the spaces and merges that depend on the
neighbouring tokens, and a multi-byte character split across tokens decodes
as U+FFFD until its last byte arrives. So each step decodes a short window:
the text of tokens [prefix, read) is already emitted; the text of [prefix, end)
minus that is the new delta, held back while it ends in U+FFFD.
"""
from __future__ import annotations


class IncrementalDetokenizer:
    _CONTEXT = 6  # prompt tokens used as left context for the first output token

    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-self._CONTEXT:])
        self.prefix = 0
        self.read = len(self.ids)

    def copy(self) -> "IncrementalDetokenizer":
        c = IncrementalDetokenizer.__new__(IncrementalDetokenizer)
        c.__dict__.update(self.__dict__)
        c.ids = list(self.ids)
        return c

    def step(self, token_id: int) -> str:
        """Add one token; return the newly complete text (possibly empty)."""
        self.ids.append(token_id)
        dec = self.tokenizer.decode
        prefix_text = dec(self.ids[self.prefix:self.read], skip_special_tokens=self.skip)
        full = dec(self.ids[self.prefix:], skip_special_tokens=self.skip)
        if len(full) > len(prefix_text) and not full.endswith("\ufffd"):
            delta = full[len(prefix_text):]
            self.prefix, self.read = self.read, len(self.ids)
            return delta
        return ""
