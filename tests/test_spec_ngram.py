"""The n-gram proposer against a plain-Python reference on random and hand-made histories (issue 34)."""
from __future__ import annotations

import numpy as np

from pagedserve.engine.sequence import Sequence
from pagedserve.engine.spec_decode.ngram import NgramProposer, lookup


def _reference(h: list[int], k: int, nmin: int, nmax: int) -> list[int]:
    """Longest suffix n in [nmin, nmax] found earlier (ending before the last token); latest occurrence."""
    for n in range(min(nmax, len(h) - 1), nmin - 1, -1):
        suffix = h[-n:]
        for end in range(len(h) - 2, n - 2, -1):  # end: index of the occurrence's last token
            if h[end - n + 1:end + 1] == suffix:
                return h[end + 1:end + 1 + k]
    return []


def test_hand_made_cases():
    h = np.array
    assert lookup([h([1, 2, 3, 9, 1, 2])], [3], 1, 3) == [[3, 9, 1]]  # "1 2" -> what followed it
    assert lookup([h([5, 6, 7])], [2], 1, 3) == [[]]  # no earlier occurrence
    assert lookup([h([1, 2, 8, 2, 9, 1, 2])], [2], 1, 2) == [[8, 2]]  # the 2-gram beats the later 1-gram
    assert lookup([h([4, 1, 2, 7, 1, 2])], [5], 2, 2) == [[7, 1, 2]]  # guesses stop at the end of history
    assert lookup([h([3, 1, 3])], [2], 2, 3) == [[]]  # only a 1-gram matches, below prompt_lookup_min


def test_matches_reference_on_random_batches():
    rng = np.random.default_rng(0)
    for trial in range(30):
        b = int(rng.integers(1, 9))
        hists = [rng.integers(0, int(rng.integers(2, 8)), int(rng.integers(1, 40))).tolist() for _ in range(b)]
        ks = rng.integers(1, 6, b).tolist()
        nmin = int(rng.integers(1, 4))
        nmax = nmin + int(rng.integers(0, 3))
        got = lookup([np.array(x) for x in hists], ks, nmin, nmax)
        assert got == [_reference(x, k, nmin, nmax) for x, k in zip(hists, ks)], (hists, ks, nmin, nmax)


def test_proposer_follows_growing_sequences():
    seq = Sequence(0, 0, [1, 2, 3, 1, 2])
    p = NgramProposer(1, 3)
    assert p.propose([seq], [2]).tokens == [[3, 1]]
    seq.token_ids += [3, 4, 1, 2, 3]
    assert p.propose([seq], [2]).tokens == [[4, 1]]  # "1 2 3" most recently followed by 4
    p.release({0})
    assert p.propose([seq], [2]).tokens == [[4, 1]]
