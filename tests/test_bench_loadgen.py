"""The load generator against a mock OpenAI server with exactly known timing (tests/doubles/mock_openai_server.py).

Truth for a request of n tokens, k tokens per chunk: TTFT = ttft, ITL = itl,
E2E = ttft + (ceil(n/k) - 1) * itl, TPOT = (E2E - TTFT) / (n - 1), tokens = n
(from usage: chunk count n/k differs on purpose).
"""
from __future__ import annotations

import contextlib
import math
import subprocess
import sys
from pathlib import Path

import pytest

from pagedserve.bench.client import BenchRequest, StreamPool
from pagedserve.bench.metrics import percentile, summarize
from pagedserve.bench.load_level import LevelSpec, RequestSettings, run_level

MOCK = Path(__file__).resolve().parents[1] / "tests" / "doubles" / "mock_openai_server.py"


@contextlib.contextmanager
def mock_server(*args: str):
    proc = subprocess.Popen([sys.executable, str(MOCK), "--port", "0", *args], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY"), line
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        proc.terminate()
        proc.wait(10)


TTFT, ITL, K = 1.0, 0.1, 2


@pytest.fixture(scope="module")
def timed_server():
    with mock_server("--ttft", str(TTFT), "--itl", str(ITL), "--tokens-per-chunk", str(K)) as url:
        yield url


async def run(url, reqs, mode="concurrency", load=4, endpoint="completions", timeout=30.0, **kw):
    spec = LevelSpec(mode, load, len(reqs), **kw)
    settings = RequestSettings(url=f"{url}/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}",
                               model="mock", endpoint=endpoint, timeout=timeout)
    pool = StreamPool(int(load) if mode == "concurrency" else 64, timeout)
    try:
        return await run_level(spec, settings, iter(reqs), pool)
    finally:
        await pool.aclose()


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
async def test_reported_metrics_match_the_truth(timed_server, endpoint):
    import httpx

    n, c, total = 20, 4, 8
    prompts = [f"{endpoint} prompt {i}" for i in range(total)]
    res = await run(timed_server, [BenchRequest(p, 3, n) for p in prompts], load=c, endpoint=endpoint)
    s = summarize(res.records, res.duration)
    assert s["completed"] == total and s["errors"] == {}
    for r in res.records:
        assert r.output_tokens == n and r.prompt_tokens == 3 and r.token_source == "usage"
        assert r.chunks == n // K  # the chunk count differs from the token count on purpose

    # Truth 1: what the server really did (on a busy 2-core machine its sleeps can overshoot).
    actual = httpx.get(timed_server + "/mock/timings").json()
    by_prompt = {p: actual[p] for p in prompts}
    true_ttft = [t["first"] for t in by_prompt.values()]
    true_e2e = [t["last"] for t in by_prompt.values()]
    true_itl = [b - a for t in by_prompt.values() for a, b in zip(t["chunks"], t["chunks"][1:])]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert s["ttft_ms"]["mean"] == pytest.approx(mean(true_ttft) * 1000, rel=0.03)
    assert s["itl_ms"]["mean"] == pytest.approx(mean(true_itl) * 1000, rel=0.03)
    assert s["e2e_ms"]["mean"] == pytest.approx(mean(true_e2e) * 1000, rel=0.03)
    true_tpot = [(t["last"] - t["first"]) / (n - 1) for t in by_prompt.values()]
    assert s["tpot_ms"]["mean"] == pytest.approx(mean(true_tpot) * 1000, rel=0.03)
    waves = math.ceil(total / c)  # closed loop: 2 waves of 4
    assert s["duration_s"] == pytest.approx(waves * mean(true_e2e), rel=0.05)

    # Truth 2: the nominal timing the mock was asked for (looser: the machine is shared).
    e2e = TTFT + (math.ceil(n / K) - 1) * ITL
    assert s["ttft_ms"]["p50"] == pytest.approx(TTFT * 1000, rel=0.08)
    assert s["itl_ms"]["p50"] == pytest.approx(ITL * 1000, rel=0.08)
    assert s["tpot_ms"]["mean"] == pytest.approx((e2e - TTFT) / (n - 1) * 1000, rel=0.08)
    assert s["output_throughput"] == pytest.approx(total * n / (waves * e2e), rel=0.08)
    assert s["output_throughput"] == pytest.approx(total * n / s["duration_s"])
    assert s["total_token_throughput"] == pytest.approx(total * (n + 3) / s["duration_s"])
    assert s["request_throughput"] == pytest.approx(total / s["duration_s"])
    assert s["achieved_concurrency"] == pytest.approx(c, rel=0.05) and s["max_concurrency"] == c
    assert res.client["loop_lag_p99_ms"] is not None


async def test_errors_are_counted_not_dropped():
    with mock_server("--ttft", "0.05", "--itl", "0.02") as url:
        prompts = ["ok 1", "ok 2", "ok 3", "x [[http500]]", "x [[http429]]", "x [[hang]]", "x [[stall]]",
                   "x [[break]]", "x [[nodone]]"]
        res = await run(url, [BenchRequest(p, 2, 5) for p in prompts], load=len(prompts), timeout=1.5)
    s = summarize(res.records, res.duration)
    assert s["requests"] == 9 and s["completed"] == 3 and s["failed"] == 6
    assert s["errors"] == {"http_500": 1, "http_429": 1, "timeout": 2, "broken_stream": 2}
    assert s["success_rate"] == pytest.approx(3 / 9)
    by_kind = {r.error_kind: r for r in res.records}
    assert by_kind["timeout"].e2e == pytest.approx(1.5, abs=0.2)  # a timeout is charged its full wait
    assert by_kind["http_500"].status == 500 and "mock http500" in by_kind["http_500"].error
    assert s["output_throughput"] == pytest.approx(3 * 5 / s["duration_s"])  # failures add no tokens
    # A broken stream's partial output is not counted as success, nor as tokens.
    assert all(r.output_tokens is None for r in res.records if r.error_kind == "broken_stream")


async def test_connection_refused_is_an_error_kind():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    res = await run(f"http://127.0.0.1:{port}", [BenchRequest("a", 1, 3)] * 2, load=2, timeout=5)
    assert [r.error_kind for r in res.records] == ["connection", "connection"]


async def test_tokenizer_fallback_when_server_sends_no_usage(model_dir):
    from pagedserve.bench.datasets import load_tokenizer
    from pagedserve.bench.serve import _count_missing_tokens

    with mock_server("--ttft", "0.01", "--itl", "0.005", "--tokens-per-chunk", "3", "--no-usage") as url:
        res = await run(url, [BenchRequest("p", 1, n) for n in (4, 7, 10)], load=3)
    assert all(r.success and r.output_tokens is None for r in res.records)
    _count_missing_tokens(res.records, load_tokenizer(str(model_dir)), None)
    assert [r.output_tokens for r in res.records] == [4, 7, 10]  # " the" is one token each; chunks were 2, 3, 4
    assert [r.prompt_tokens for r in res.records] == [1, 1, 1]
    assert {r.token_source for r in res.records} == {"tokenizer"}


async def test_poisson_rate_mode(timed_server):
    rate = 25.0
    res = await run(timed_server, [BenchRequest("p", 1, 4) for _ in range(50)], mode="rate", load=rate, seed=1)
    s = summarize(res.records, res.duration)
    assert s["completed"] == 50
    sched = sorted(r.scheduled for r in res.records)
    gaps = [b - a for a, b in zip(sched, sched[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(1 / rate, rel=0.35)  # 49 exponential gaps
    assert max(r.start - r.scheduled for r in res.records) < 0.05  # sent when scheduled
    # Open loop: the server's latency does not slow arrivals, so several overlap.
    assert s["max_concurrency"] >= 5
    capped = await run(timed_server, [BenchRequest("p", 1, 4) for _ in range(12)], mode="rate", load=math.inf,
                       max_concurrency=3)
    assert summarize(capped.records, capped.duration)["max_concurrency"] == 3


async def test_holds_600_concurrent_streams():
    """600 streams from one event loop: all in flight at once, none lost, and the timing is either
    accurate or the client says it was not (on 2 busy cores the burst of 600 requests is client-bound)."""
    ttft, itl = 1.5, 0.2
    with mock_server("--ttft", str(ttft), "--itl", str(itl), "--tokens-per-chunk", "1") as url:
        res = await run(url, [BenchRequest("p", 1, 4) for _ in range(600)], load=600, timeout=60)
    s = summarize(res.records, res.duration)
    assert s["completed"] == 600 and s["max_concurrency"] == 600
    assert all(r.output_tokens == 4 for r in res.records)
    ttft_ms = s["ttft_ms"]["p50"]
    assert ttft_ms >= ttft * 1000  # never under-reported
    sent = percentile([r.send_delay for r in res.records], 50) * 1000
    assert ttft_ms - sent == pytest.approx(ttft * 1000, rel=0.4)  # what the server took, after the client's delay
    if ttft_ms > ttft * 1000 * 1.1:
        assert res.client["warnings"], (ttft_ms, res.client)


def test_client_warnings_name_the_bottleneck():
    from pagedserve.bench.load_level import client_warnings

    spec = LevelSpec("concurrency", 600, 10)
    hot = client_warnings({"cpu_fraction": 0.5, "cpu_peak_fraction": 0.95, "loop_lag_p99_ms": 80.0}, spec)
    assert len(hot) == 1 and "client is the bottleneck" in hot[0]
    starved = client_warnings({"cpu_fraction": 0.2, "loop_lag_p99_ms": 50.0}, spec)
    assert len(starved) == 1 and "starved" in starved[0]
    assert client_warnings({"cpu_fraction": 0.2, "loop_lag_p99_ms": 2.0}, spec) == []
    slow_send = client_warnings({"cpu_fraction": 0.2, "loop_lag_p99_ms": 2.0, "send_delay_p99_ms": 300.0}, spec)
    assert len(slow_send) == 1 and "inside the client" in slow_send[0]


async def test_python310_deadline_fallback():
    import asyncio

    from pagedserve.bench.client import _fallback_deadline

    with pytest.raises(TimeoutError):
        async with _fallback_deadline(0.05):
            await asyncio.sleep(5)
    async with _fallback_deadline(5):
        await asyncio.sleep(0.01)

    async def victim():
        async with _fallback_deadline(5):
            await asyncio.sleep(5)

    task = asyncio.ensure_future(victim())
    await asyncio.sleep(0.01)
    task.cancel()  # an outside cancel stays a cancel, not a timeout
    with pytest.raises(asyncio.CancelledError):
        await task
