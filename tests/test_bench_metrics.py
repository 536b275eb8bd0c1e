"""Unit tests of the load tester's statistics, SLOs, knee detection, arrivals and datasets (no server)."""
from __future__ import annotations

import json
import math
import random
import statistics

import pytest

from pagedserve.bench.client import RequestRecord, build_body, endpoint_url, BenchRequest
from pagedserve.bench.metrics import SLO, find_knee, parse_duration, parse_slo, percentile, summarize
from pagedserve.bench.report import analyze
from pagedserve.bench.load_level import gamma_intervals
from pagedserve.errors import InvalidRequestError


def rec(i, ttft=0.1, e2e=1.0, out=10, prompt=5, ok=True, kind=None, start=0.0, itl=None):
    r = RequestRecord(i, start=start, success=ok, error_kind=kind, ttft=ttft if ok else None, e2e=e2e,
                      prompt_tokens=prompt if ok else None, output_tokens=out if ok else None,
                      token_source="usage" if ok else None)
    r.itl = itl if itl is not None else ([(e2e - ttft) / (out - 1)] * (out - 1) if ok and out > 1 else [])
    return r


def test_percentile_matches_numpy_linear():
    np = pytest.importorskip("numpy")
    xs = [random.Random(1).random() for _ in range(101)]
    for p in (0, 50, 90, 99, 100):
        assert percentile(xs, p) == pytest.approx(float(np.percentile(xs, p)))
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0


def test_parse_slo_and_durations():
    slo = parse_slo("ttft=500ms,tpot=50ms,e2e=10s")
    assert (slo.ttft, slo.tpot, slo.e2e, slo.itl) == (0.5, 0.05, 10.0, None)
    assert parse_duration("250") == 0.25  # bare numbers are ms, as vLLM's --goodput
    assert parse_duration("2m") == 120 and parse_duration("1.5s") == 1.5 and parse_duration("300us") == pytest.approx(3e-4)
    assert not parse_slo(None) and not parse_slo("")
    for bad in ("ttft", "speed=1s", "ttft=fast", "ttft=5parsecs"):
        with pytest.raises(InvalidRequestError):
            parse_slo(bad)
    assert "ttft≤500ms" in slo.describe() and "e2e≤10s" in slo.describe()


def test_tpot_is_vllm_definition():
    r = rec(0, ttft=0.2, e2e=2.2, out=21)
    assert r.tpot == pytest.approx(0.1)  # (2.2 - 0.2) / (21 - 1)
    assert rec(1, out=1).tpot is None
    assert rec(2, ok=False, kind="timeout").tpot is None


def test_summarize_counts_failures_and_uses_token_counts():
    recs = [rec(i, start=i * 0.5) for i in range(8)]
    recs += [rec(8, ok=False, kind="http_500", e2e=0.01), rec(9, ok=False, kind="timeout", e2e=3.0)]
    s = summarize(recs, duration=5.0, slo=SLO(ttft=0.2))
    assert s["requests"] == 10 and s["completed"] == 8 and s["failed"] == 2
    assert s["success_rate"] == 0.8
    assert s["errors"] == {"http_500": 1, "timeout": 1}
    assert s["output_throughput"] == pytest.approx(80 / 5.0)
    assert s["total_token_throughput"] == pytest.approx((80 + 40) / 5.0)
    assert s["request_throughput"] == pytest.approx(8 / 5.0)
    assert s["ttft_ms"]["p50"] == pytest.approx(100) and s["e2e_ms"]["mean"] == pytest.approx(1000)
    assert s["tpot_ms"]["mean"] == pytest.approx(100)
    assert s["slo_attainment"] == 0.8 and s["goodput"] == pytest.approx(8 / 5.0)
    # Little's law over every request, failed ones included: (8 * 1.0 + 0.01 + 3.0) / 5
    assert s["achieved_concurrency"] == pytest.approx((8 + 3.01) / 5.0)
    assert s["max_concurrency"] == 3  # requests 0..7 start every 0.5 s and last 1 s (+ two at t=0)


def test_slo_goodput_excludes_slow_requests():
    recs = [rec(0, ttft=0.1), rec(1, ttft=0.6), rec(2, ttft=0.1, e2e=20.0, out=10)]
    s = summarize(recs, 10.0, parse_slo("ttft=500ms,e2e=10s"))
    assert s["slo_attainment"] == pytest.approx(1 / 3) and s["goodput"] == pytest.approx(0.1)
    itl_slo = SLO(itl=0.15)
    assert itl_slo.met_by(rec(3, itl=[0.1, 0.1])) and not itl_slo.met_by(rec(4, itl=[0.1, 0.2]))


@pytest.mark.parametrize(
    "loads, tput, ok, want_load, reason",
    [
        ([1, 2, 4, 8, 16, 32], [10, 19, 36, 60, 62, 61], [True] * 6, 8, "plateau"),  # 16 adds 3%
        ([1, 2, 4, 8], [10, 20, 40, 80], [True] * 4, 8, "still_rising"),
        ([1, 2, 4, 8, 16], [10, 20, 40, 80, 150], [True, True, True, False, False], 4, "slo"),
        ([1, 2, 4, 8], [1.3, 1.0, 1.4, 2.6], [True] * 4, 8, "still_rising"),  # a noisy dip is not the knee
        ([1, 2, 4, 8, 16], [10, 30, 29, 31, 31.2], [True] * 5, 2, "plateau"),  # nothing above 2 adds 5%
        ([1, 2, 4, 8], [10, 20, 40, 80], [True, False, True, True], 1, "slo"),  # levels past a break don't count
        ([16, 1, 4, 8], [62, 10, 36, 60], [True] * 4, 8, "plateau"),  # unsorted input
        ([1, 2], [10, 20], [False, False], None, "none_ok"),
        ([5], [10], [True], 5, "still_rising"),
    ],
)
def test_find_knee_on_synthetic_sweeps(loads, tput, ok, want_load, reason):
    k = find_knee(loads, tput, ok)
    assert k["load"] == want_load and k["reason"] == reason
    if want_load is not None:
        assert loads[k["index"]] == want_load


def test_knee_threshold_is_five_percent():
    assert find_knee([1, 2], [100, 105.5], [True, True])["reason"] == "still_rising"
    assert find_knee([1, 2], [100, 104.5], [True, True])["reason"] == "plateau"


def _summary(tput, success=1.0, attain=1.0, ttft99=100.0):
    return {"output_throughput": tput, "success_rate": success, "slo_attainment": attain, "errors": {"timeout": 3} if success < 1 else {},
            "ttft_ms": {"p99": ttft99}}


def test_analyze_recommendation_texts():
    a = analyze("concurrency", [1, 2, 4, 8], [_summary(10), _summary(19), _summary(35), _summary(35.5, ttft99=900)], SLO(), 0.99)
    assert a["load"] == 4 and a["reason"] == "plateau"
    assert "at most 4 concurrent requests" in a["recommendation"] and "900" in a["recommendation"]
    a = analyze("concurrency", [1, 2, 4], [_summary(10), _summary(19), _summary(35, success=0.9)], SLO(), 0.99)
    assert a["load"] == 2 and a["reason"] == "errors" and "timeout ×3" in a["recommendation"]
    a = analyze("rate", [1, 2], [_summary(10, attain=0.5), _summary(19, attain=0.2)], SLO(ttft=0.1), 0.99)
    assert a["index"] is None and "No tested load" in a["recommendation"]
    a = analyze("rate", [1, math.inf], [_summary(10), _summary(30)], SLO(), 0.99)
    assert a["reason"] == "still_rising" and "sweep higher" in a["recommendation"]


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_gamma_intervals_have_the_right_mean_and_spread(burstiness):
    it = gamma_intervals(10.0, burstiness, random.Random(0))
    xs = [next(it) for _ in range(20000)]
    assert statistics.mean(xs) == pytest.approx(0.1, rel=0.05)
    cv = statistics.pstdev(xs) / statistics.mean(xs)
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.08)
    assert next(gamma_intervals(math.inf, 1.0, random.Random(0))) == 0.0


def test_endpoint_url_and_body():
    assert endpoint_url("http://h:1", "completions") == "http://h:1/v1/completions"
    assert endpoint_url("http://h:1/v1/", "chat") == "http://h:1/v1/chat/completions"
    assert endpoint_url("http://h:1/x/v1/completions", "chat") == "http://h:1/x/v1/completions"
    b = build_body(BenchRequest("hi", 1, 7), "m", "chat", True, 0.0)
    assert b["messages"] == [{"role": "user", "content": "hi"}] and b["max_tokens"] == 7
    assert b["stream"] and b["stream_options"] == {"include_usage": True} and b["ignore_eos"]
    b = build_body(BenchRequest("hi", 1, 7), "m", "completions", False, 0.0)
    assert b["prompt"] == "hi" and "ignore_eos" not in b


def test_jsonl_and_sharegpt_datasets(tmp_path):
    from pagedserve.bench.datasets import JsonlDataset, ShareGPTDataset, make_dataset

    p = tmp_path / "w.jsonl"
    p.write_text('{"prompt": "a b c", "output_len": 5}\n\n{"messages": [{"role": "user", "content": "hey"}]}\n')
    ds = JsonlDataset(str(p), output_len=9)
    got = [next(s) for s in [ds.stream(0)] for _ in range(4)]
    assert sorted({(r.prompt, r.output_len) for r in got}) == [("a b c", 5), ("hey", 9)]
    assert any(r.messages for r in got)

    class WordTok:  # one token per word: enough to test ShareGPT's filters
        def __call__(self, text, add_special_tokens=True):
            return type("E", (), {"input_ids": text.split()})()

    sg = tmp_path / "sg.json"
    convs = [{"conversations": [{"from": "human", "value": "w " * 10}, {"from": "gpt", "value": "r " * 6}]},
             {"conversations": [{"from": "human", "value": "too short"}, {"from": "gpt", "value": "r " * 6}]},
             {"conversations": [{"from": "human", "value": "w " * 8}]}]
    sg.write_text(json.dumps(convs))
    ds = ShareGPTDataset(str(sg), WordTok())
    assert [(r.prompt_len, r.output_len) for r in ds.items] == [(10, 6)]
    assert ShareGPTDataset(str(sg), WordTok(), output_len=3).items[0].output_len == 3
    with pytest.raises(InvalidRequestError):
        make_dataset("csv:x", tokenizer_name=None, input_len=1, output_len=1, range_ratio=0, prefix_len=0, seed=0)


def test_random_dataset_is_token_exact(model_dir):
    from pagedserve.bench.datasets import RandomDataset, load_tokenizer

    tok = load_tokenizer(str(model_dir))
    ds = RandomDataset(tok, input_len=64, output_len=16, range_ratio=0.5, prefix_len=24, seed=0)
    reqs = [next(s) for s in [ds.stream(1)] for _ in range(40)]
    for r in reqs:
        assert len(tok(r.prompt).input_ids) == r.prompt_len
        assert 24 + 32 <= r.prompt_len <= 24 + 96 and 8 <= r.output_len <= 24
        assert r.prompt.startswith(ds.prefix)
    assert len({r.prompt_len for r in reqs}) > 5
    exact = RandomDataset(tok, input_len=200, output_len=16, seed=3)
    assert {next(s).prompt_len for s in [exact.stream(2)] for _ in range(20)} == {200}
    # Seeds give repeatable, distinct streams (each sweep level gets fresh prompts).
    assert next(exact.stream(5)).prompt == next(exact.stream(5)).prompt != next(exact.stream(6)).prompt


@pytest.mark.parametrize("lo, hi, want_log", [(202.0, 210.0, False), (20.0, 5000.0, True), (90.0, 130.0, False)])
def test_value_axis_always_labels_numbers(lo, hi, want_log):
    """A narrow range on a log axis has no decade tick, so it had no label: e.g. TTFT 202-210 ms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pagedserve.bench.report import value_axis

    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [lo, (lo + hi) / 2, hi])
    value_axis(ax, "y", [lo, hi])
    fig.canvas.draw()
    assert (ax.get_yscale() == "log") == want_log
    shown = [float(t.get_text()) for t in ax.get_yticklabels() if t.get_text()
             and ax.get_ylim()[0] <= t.get_position()[1] <= ax.get_ylim()[1]]
    assert len(shown) >= 3, shown  # at least three readable numbers inside the visible range
    assert all(lo * 0.5 <= v <= hi * 2 for v in shown)
    plt.close(fig)


def test_plots_render_narrow_and_wide_sweeps(tmp_path):
    from pagedserve.bench.report import analyze, plot
    from pagedserve.bench.load_level import LevelResult, LevelSpec

    for name, ttfts in (("narrow", [0.202, 0.205, 0.207, 0.210]), ("wide", [0.02, 0.08, 0.9, 5.0])):
        loads = [1, 64, 256, 512]
        results, summaries = [], []
        for load, t in zip(loads, ttfts):
            recs = [rec(i, ttft=t * (1 + i / 400), e2e=t + 1.0 + i / 100, out=128) for i in range(40)]
            results.append(LevelResult(LevelSpec("concurrency", load, 40), recs, 2.0, 0.0))
            summaries.append(summarize(recs, 2.0 + load / 100))
        analysis = analyze("concurrency", loads, summaries, SLO(), 0.99)
        paths = plot(str(tmp_path / name), "concurrency", loads, summaries, results, analysis)
        assert [p.rsplit("/", 1)[1] for p in paths] == ["throughput_vs_load.png", "ttft_vs_load.png", "latency_cdf.png"]
        assert all((tmp_path / name / p.rsplit("/", 1)[1]).stat().st_size > 5000 for p in paths)


def test_client_bound_levels_are_never_the_knee():
    """Throughput that stops rising because the CLIENT saturated is not a knee: the search stops below."""
    loads = [1, 64, 256, 512]
    summaries = []
    for load, tput in zip(loads, [100.0, 5000.0, 9000.0, 9100.0]):  # a 'plateau' at 256 -> 512
        s = summarize([rec(i) for i in range(8)], 1.0)
        s["output_throughput"] = tput
        summaries.append(s)
    free = analyze("concurrency", loads, summaries, SLO(), 0.99)
    assert free["load"] == 256 and free["reason"] == "plateau"
    bound = analyze("concurrency", loads, summaries, SLO(), 0.99, client_bound=[False, False, True, True])
    assert bound["load"] == 64 and bound["reason"] == "client" and bound["ok"] == [True, True, False, False]
    assert "load generator itself was the limit" in bound["recommendation"] and "--workers" in bound["recommendation"]
    none = analyze("concurrency", loads, summaries, SLO(), 0.99, client_bound=[True] * 4)
    assert none["index"] is None and "load generator itself limited" in none["recommendation"]


def test_saturation_verdicts():
    from pagedserve.bench.load_level import LevelSpec
    from pagedserve.bench.saturation import summarize_client

    spec = LevelSpec("concurrency", 256, 10)
    calm = {"cpu_s": 1.0, "wall_s": 10.0, "cpu_fraction": 0.1, "cpu_peak_fraction": 0.3, "lags": [0.001] * 100}
    hot = dict(calm, cpu_peak_fraction=0.92)
    assert not summarize_client([calm, calm], [], spec)["client_bound"]
    c = summarize_client([calm, hot], [], spec)  # one busy worker is enough
    assert c["client_bound"] and c["workers"] == 2 and "one of its 2 worker processes" in c["warnings"][0]
    mild = dict(calm, lags=[0.03] * 100)  # 30 ms lag while idle: a warning, not client-bound
    c = summarize_client([mild], [], spec)
    assert c["warnings"] and not c["client_bound"]
    c = summarize_client([dict(calm, lags=[0.06] * 100)], [], spec)
    assert c["client_bound"]
    slow_send = [rec(i) for i in range(10)]
    for r in slow_send:
        r.send_delay = 0.2
    assert summarize_client([calm], slow_send, spec)["client_bound"]
    assert summarize_client([calm], [], spec, failures=["worker 1 died"])["client_bound"]
