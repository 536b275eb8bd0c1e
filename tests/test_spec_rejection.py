"""The rejection rule keeps the target distribution exactly, whatever the drafts (issue 34).

Unit level: one target distribution, deliberately bad drafts (a fixed wrong token, a draft distribution
far from the target), 8,000 verifications in one call; the emitted first and second tokens are compared
with the target by Pearson's chi-square test. Engine level: a tiny random-weight model samples its first
tokens with and without n-gram drafts, and the two empirical distributions are compared by a two-sample
chi-square test. Each test fails by chance with probability at most ALPHA = 1e-3 per comparison (the
draws are seeded, so a given torch build gives the same verdict every run)."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from pagedserve.engine.spec_decode.rejection import VerifyRow, verify
from pagedserve.model.sampler import SampleRow
from pagedserve.sampling_params import SamplingParams

ALPHA = 1e-3
V = 6


def _chi2_sf(stat: float, df: int) -> float:
    """P(X >= stat) for X ~ chi-square(df): the regularised upper incomplete gamma Q(df/2, stat/2)."""
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _two_sample(table: list[list[int]]) -> float:
    """p-value of Pearson's chi-square test that two rows of counts come from one distribution."""
    cols = [sum(c) for c in zip(*table)]
    rows = [sum(r) for r in table]
    total = sum(rows)
    stat = sum((table[i][j] - rows[i] * cols[j] / total) ** 2 / (rows[i] * cols[j] / total)
               for i in range(2) for j in range(len(cols)) if cols[j])
    return _chi2_sf(stat, sum(1 for c in cols if c) - 1)


def _gof(counts: Counter, probs: torch.Tensor, n: int) -> float:
    """p-value of Pearson's goodness-of-fit test of `counts` against `probs`."""
    keep = [t for t in range(len(probs)) if probs[t] > 0]
    assert set(counts) <= set(keep), "a token outside the target's support was emitted"
    stat = sum((counts.get(t, 0) - n * float(probs[t])) ** 2 / (n * float(probs[t])) for t in keep)
    return _chi2_sf(stat, len(keep) - 1)


def _rows(params, k):
    return [SampleRow(params, [], [], None, []) for _ in range(k + 1)]


@pytest.mark.parametrize("kind", ["one_hot", "distribution"])
def test_rejection_keeps_target_distribution(kind):
    torch.manual_seed(0)
    n, k = 8000, 2
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0], [0.0, 1.5, -0.5, 1.0, 0.2, -2.0],
                           [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    params = SamplingParams(temperature=1.0, top_k=5)  # top-k: the token outside it must never appear
    g = torch.Generator().manual_seed(1)
    if kind == "one_hot":  # always a token the target never samples (top-k), then an unlikely one
        specs = [VerifyRow(_rows(params, k), [5, 3], None, None) for _ in range(n)]
    else:  # drafts drawn from a distribution far from the target's, which the rule is given
        q = torch.softmax(torch.tensor([[-2.0, -1.0, 0.0, 1.0, 2.0, 3.0]] * k), dim=-1)
        draws = torch.multinomial(q, n, replacement=True, generator=g).T.tolist()
        specs = [VerifyRow(_rows(params, k), d, q, None) for d in draws]
    out = verify(logits.repeat(n, 1), specs, g)
    p = torch.softmax(logits, dim=-1)
    p0 = p[0].clone()
    p0[p0 < p0.topk(5).values[-1]] = 0
    p0 /= p0.sum()
    assert _gof(Counter(o[0] for o in out), p0, n) > ALPHA
    if kind == "one_hot":  # the drafted token 5 is outside top-k: never kept
        assert all(len(o) == 1 for o in out)


def test_rejection_accepts_and_keeps_second_position():
    """Drafts drawn from the target itself are all kept with probability 1 at the first position; the token
    after a kept draft follows the target's next-position distribution."""
    n, k = 8000, 1
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.3, 1.2, -0.4, 0.8, 0.0, -1.0]])
    p = torch.softmax(logits, dim=-1)
    params = SamplingParams(temperature=1.0)
    specs = [VerifyRow(_rows(params, k), [0], None, None) for _ in range(n)]
    out = verify(logits.repeat(n, 1), specs, torch.Generator().manual_seed(2))
    kept = [o for o in out if len(o) == 2]
    assert abs(len(kept) / n - float(p[0, 0])) < 4 * (float(p[0, 0]) * (1 - float(p[0, 0])) / n) ** 0.5
    assert _gof(Counter(o[1] for o in kept), p[1], len(kept)) > ALPHA
    rejected = Counter(o[0] for o in out if len(o) == 1)
    res = p[0].clone()
    res[0] = 0
    assert _gof(rejected, res / res.sum(), sum(rejected.values())) > ALPHA


def test_engine_sampling_distribution_tiny_model(tmp_path):
    """The first three tokens on a tiny model, 300 seeds, with and without n-gram drafts. The prompt holds
    every token of the vocabulary once (shuffled), so whatever the model samples is found in it and the
    token after it is drafted: drafts exist at every step and are mostly wrong. Tokens 2 and 3 (the ones
    drafts touch) must have the same distribution either way (two-sample chi-square)."""
    from pagedserve import LLM
    from tests.tiny_models import VOCAB, tiny_model_dir

    d = tiny_model_dir(tmp_path / "tiny")
    llm = LLM(model=str(d), max_model_len=512, num_kv_blocks=600, max_num_seqs=64,
              speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1,
                                  "prompt_lookup_max": 2})
    eng, spec = llm.engine, llm.engine.spec
    prompt = {"prompt_token_ids": torch.randperm(VOCAB - 2, generator=torch.Generator().manual_seed(0))
              .add(2).tolist()}
    reps = 300

    def draw(with_spec: bool, base: int) -> list[tuple[int, ...]]:
        eng.spec = spec if with_spec else None
        ps = [SamplingParams(temperature=1.0, top_k=4, max_tokens=3, ignore_eos=True, seed=base + i)
              for i in range(reps)]
        outs = llm.generate([prompt] * reps, ps, use_tqdm=False)
        return [tuple(o.outputs[0].token_ids) for o in outs]

    a, b = draw(False, 0), draw(True, 10_000)
    eng.spec = spec
    st = spec.stats
    assert st.num_drafts > reps // 2 and 0 < st.num_accepted_tokens < st.num_draft_tokens // 2
    for pos in (1, 2):
        ca, cb = Counter(t[pos] for t in a), Counter(t[pos] for t in b)
        toks = sorted(set(ca) | set(cb))
        table = [[ca.get(t, 0) for t in toks], [cb.get(t, 0) for t in toks]]
        assert _two_sample(table) > ALPHA, table
