"""Prompt lookup: find the sequence's latest tokens earlier in its own history and guess what followed.

For each sequence, the longest suffix of n tokens (prompt_lookup_min <= n <= prompt_lookup_max) that
occurs earlier in its history wins, the most recent occurrence among equals; the up to k tokens after
that occurrence are the guesses. Vectorized over the batch: histories sit right-aligned in one matrix
(kept as per-sequence numpy buffers that grow by the new tokens only), one comparison of every position
against each row's last token finds the candidates, and the few candidates are extended backwards by
gathers. At batch 256 with 2K-token histories the lookup takes a few milliseconds on one core.
"""
from __future__ import annotations

import numpy as np

from pagedserve.engine.sequence import Sequence
from pagedserve.engine.spec_decode.proposer import Drafts

_PAD = -1


class NgramProposer:
    needs_hidden_states = False

    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int):
        self.nmin, self.nmax = prompt_lookup_min, prompt_lookup_max
        self._hist: dict[int, tuple[np.ndarray, int]] = {}  # seq id -> (buffer, valid length)

    def _history(self, seq: Sequence) -> np.ndarray:
        ids = seq.token_ids
        buf, n = self._hist.get(seq.seq_id, (None, 0))
        if buf is None or n > len(ids) or len(ids) > len(buf):
            new = np.empty(max(64, 2 * len(ids)), dtype=np.int32)
            if buf is not None and n <= len(ids):
                new[:n] = buf[:n]
            else:
                n = 0
            buf = new
        if len(ids) > n:
            buf[n:len(ids)] = ids[n:]
            n = len(ids)
        self._hist[seq.seq_id] = (buf, n)
        return buf[:n]

    def release(self, seq_ids: set[int]) -> None:
        for s in seq_ids:
            self._hist.pop(s, None)

    def propose(self, seqs: list[Sequence], ks: list[int]) -> Drafts:
        if not seqs:
            return Drafts([], [])
        hists = [self._history(s) for s in seqs]
        return Drafts(lookup(hists, ks, self.nmin, self.nmax), [None] * len(seqs))


def lookup(hists: list[np.ndarray], ks: list[int], nmin: int, nmax: int) -> list[list[int]]:
    """The guesses for each history (see the module docstring); [] where no suffix of >= nmin matches."""
    b = len(hists)
    width = max(len(h) for h in hists)
    kmax = max(ks)
    out: list[list[int]] = [[] for _ in range(b)]
    if width < 2 or kmax < 1:
        return out
    mat = np.full((b, width), _PAD, dtype=np.int32)
    for i, h in enumerate(hists):
        mat[i, width - len(h):] = h
    last = mat[:, -1]
    rows, cols = np.nonzero(mat[:, :-1] == last[:, None])  # candidate ends of an earlier occurrence
    keep = last[rows] != _PAD
    rows, cols = rows[keep], cols[keep]
    if rows.size == 0:
        return out
    run = np.ones(rows.size, dtype=np.int64)  # matched suffix length at each candidate
    alive = np.ones(rows.size, dtype=bool)
    for i in range(1, nmax):
        ok = cols >= i
        want = mat[rows, width - 1 - i]
        got = mat[rows, np.where(ok, cols - i, 0)]
        alive &= ok & (got == want) & (want != _PAD)
        run += alive
    good = run >= nmin
    rows, cols, run = rows[good], cols[good], run[good]
    if rows.size == 0:
        return out
    best = np.full(b, -1, dtype=np.int64)
    np.maximum.at(best, rows, run * width + cols)  # longest match, then the most recent
    hit = np.nonzero(best >= 0)[0]
    start = best[hit] % width + 1
    idx = start[:, None] + np.arange(kmax)[None, :]
    limit = np.minimum(np.asarray(ks)[hit], width - start)  # guesses stop at the end of the history
    vals = mat[hit[:, None], np.minimum(idx, width - 1)]
    for j, r in enumerate(hit.tolist()):
        out[r] = vals[j, :limit[j]].tolist()
    return out
