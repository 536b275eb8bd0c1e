"""End a top-level JSON array at the first item that repeats an earlier one (tool_choice "required").

A greedy small model asked for calls repeats its last one until max_tokens: the grammar allows
another item as long as the array is open. This closes the array instead, at the matcher:

- while an item's text is a prefix of an earlier item's, a token that would complete that item
  and run on past it (say `}},` fusing the item's end with the next separator) is masked: the
  array must stay closable right after the repeat;
- once an item's text equals an earlier item's, only tokens starting with `]` are allowed (when
  the grammar allows `]` there), so the array ends and the grammar's end then allows only EOS.

The repeated item itself is in the output: the server's parser never reports it as a call
(constrained_calls.py), and withholds a call's deltas while its text may still become a repeat.
Items are compared as text (the grammar is compact and keeps properties in schema order, so equal
text is equal arguments). Only object and array items are tracked; a token long enough to hold a
whole item with its separator is not looked for (tool-call items are longer than any token).
"""
from __future__ import annotations

import bisect

import numpy as np

_CLOSE = ord("]")


class TokenBytes:
    """Each token's bytes, plus a sorted copy so that the tokens starting with a byte string are one range."""

    def __init__(self, decoded: list[bytes]):
        self.of = decoded
        order = sorted(range(len(decoded)), key=decoded.__getitem__)
        self._sorted = [decoded[i] for i in order]
        self._ids = np.asarray(order, dtype=np.int64)
        self.closing = self.with_prefix(b"]")

    def with_prefix(self, prefix: bytes) -> np.ndarray:
        lo = bisect.bisect_left(self._sorted, prefix)
        stem = prefix.rstrip(b"\xff")  # the first byte string after every one that starts with `prefix`
        hi = bisect.bisect_left(self._sorted, stem[:-1] + bytes([stem[-1] + 1]), lo) if stem else len(self._sorted)
        return self._ids[lo:hi]


def _bits(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return ids >> 5, (np.uint32(1) << (ids & 31).astype(np.uint32))


class RepeatCloser:
    """One sequence's view of its top-level array: the items so far and the one being generated."""

    def __init__(self, vocab: TokenBytes):
        self.vocab = vocab
        self.depth = 0  # 0: before (or after) the array, 1: between items, 2+: inside an item
        self.in_str = self.esc = False
        self.item: bytearray | None = None
        self.items: list[bytes] = []  # completed items, in order
        self.repeated = False  # the last completed item equals an earlier one: the array must end

    def feed(self, token: int) -> None:
        for c in self.vocab.of[token]:
            self._byte(c)

    def _byte(self, c: int) -> None:
        if self.item is None:
            if self.depth == 0 and c == 0x5B:  # [
                self.depth = 1
            elif self.depth == 1:
                if c in b"{[":
                    self.item, self.depth, self.repeated = bytearray([c]), 2, False
                elif c == _CLOSE:
                    self.depth = 0
                elif c == 0x2C:  # a separator after all: too late to close here
                    self.repeated = False
            return
        self.item.append(c)
        if self.in_str:
            if self.esc:
                self.esc = False
            elif c == 0x5C:  # backslash
                self.esc = True
            elif c == 0x22:  # "
                self.in_str = False
        elif c == 0x22:
            self.in_str = True
        elif c in b"{[":
            self.depth += 1
        elif c in b"}]":
            self.depth -= 1
            if self.depth == 1:
                done = bytes(self.item)
                self.repeated = done in self.items
                self.items.append(done)
                self.item = None

    def restrict(self, row: np.ndarray) -> None:
        """Narrow one row of the grammar's bitmask (uint32 words, modified in place) by the rule above."""
        if self.repeated:
            words, bits = _bits(self.vocab.closing)
            keep = np.zeros_like(row)
            np.bitwise_or.at(keep, words, bits)
            if (row & keep).any():  # else the grammar cannot close here (minItems): leave it be
                row &= keep
            return
        if self.item is None or not self.items:
            return
        item, n = bytes(self.item), len(self.item)
        for rest in {e[n:] for e in self.items if len(e) > n and e.startswith(item)}:
            ids = self.vocab.with_prefix(rest)
            ids = np.asarray([t for t in ids.tolist() if len(self.vocab.of[t]) > len(rest)
                              and self.vocab.of[t][len(rest)] != _CLOSE], dtype=np.int64)
            if len(ids):
                words, bits = _bits(ids)
                np.bitwise_and.at(row, words, ~bits)
