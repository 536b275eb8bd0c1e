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
        # A token that runs past an item's end holds its closing bracket: none is longer than this.
        self.reach = max((len(b) for b in decoded if b"}" in b or b"]" in b), default=0)
        order = sorted(range(len(decoded)), key=decoded.__getitem__)
        self._sorted = [decoded[i] for i in order]
        self._ids = np.asarray(order, dtype=np.int64)
        self.closing = self.with_prefix(b"]")
        self.moves: dict[tuple, tuple] = {}  # (token, in_str, esc) -> its effect inside an item, see _move

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
        self.alike: list[bytes] = []  # earlier items that the current item is a prefix of, so far
        self.repeated = False  # the last completed item equals an earlier one: the array must end
        self.restricts = False  # whether `restrict` may change anything now (most steps not: callers skip it)

    def feed(self, token: int) -> None:
        b = self.vocab.of[token]
        move = None
        if self.item is not None:
            key = (token, self.in_str, self.esc)
            move = self.vocab.moves.get(key)
            if move is None:
                move = self.vocab.moves[key] = _move(b, self.in_str, self.esc)
        if move is not None and self.depth + move[1] > 1:  # stays inside the item: no byte-by-byte walk
            if self.alike:
                k = len(self.item)
                self.alike = [e for e in self.alike if e[k:k + len(b)] == b]
            self.item += b
            self.depth += move[0]
            self.in_str, self.esc = move[2], move[3]
        else:
            for c in b:
                self._byte(c)
        self.restricts = self.repeated or (
            bool(self.alike) and min(map(len, self.alike)) - len(self.item) < self.vocab.reach)

    def _byte(self, c: int) -> None:
        if self.item is None:
            if self.depth == 0 and c == 0x5B:  # [
                self.depth = 1
            elif self.depth == 1:
                if c in b"{[":
                    self.item, self.depth, self.repeated = bytearray([c]), 2, False
                    self.alike = [e for e in self.items if e[0] == c]
                elif c == _CLOSE:
                    self.depth, self.repeated = 0, False
                elif c == 0x2C:  # a separator after all: too late to close here
                    self.repeated = False
            return
        if self.alike:
            k = len(self.item)
            self.alike = [e for e in self.alike if len(e) > k and e[k] == c]
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
                self.item, self.alike = None, []

    def restrict(self, row: np.ndarray) -> None:
        """Narrow one row of the grammar's bitmask (uint32 words, modified in place) by the rule above."""
        if self.repeated:
            words, bits = _bits(self.vocab.closing)
            keep = np.zeros_like(row)
            np.bitwise_or.at(keep, words, bits)
            if (row & keep).any():  # else the grammar cannot close here (minItems): leave it be
                row &= keep
            return
        n = len(self.item) if self.item is not None else 0
        for rest in {e[n:] for e in self.alike if len(e) > n}:
            ids = self.vocab.with_prefix(rest)
            ids = np.asarray([t for t in ids.tolist() if len(self.vocab.of[t]) > len(rest)
                              and self.vocab.of[t][len(rest)] != _CLOSE], dtype=np.int64)
            if len(ids):
                words, bits = _bits(ids)
                np.bitwise_and.at(row, words, ~bits)


def _move(b: bytes, in_str: bool, esc: bool) -> tuple[int, int, bool, bool]:
    """A token's effect on the scanner inside an item: (depth change, lowest depth change on the way,
    in_str after, esc after)."""
    depth = low = 0
    for c in b:
        if in_str:
            if esc:
                esc = False
            elif c == 0x5C:
                esc = True
            elif c == 0x22:
                in_str = False
        elif c == 0x22:
            in_str = True
        elif c in b"{[":
            depth += 1
        elif c in b"}]":
            depth -= 1
            low = min(low, depth)
    return depth, low, in_str, esc
