"""`bench serve --workers N`: the load split over processes, against the mock server with known timing.

Truth: the mock's own record of when each chunk left (GET /mock/timings) and the nominal
timing it was asked for; the tolerances are those of tests/test_bench_loadgen.py.
"""
from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from pagedserve.bench.client import BenchRequest, StreamPool
from pagedserve.bench.metrics import percentile, summarize
from pagedserve.bench.load_level import LevelSpec, RequestSettings, Source, finish_level
from pagedserve.bench.load_processes import WorkerPool, arrival_schedule, auto_workers, proportional, split
from tests.test_bench_loadgen import mock_server

TTFT, ITL, N = 1.0, 0.1, 6


def settings(url: str) -> RequestSettings:
    return RequestSettings(url=f"{url}/v1/completions", model="mock", timeout=30.0)


def test_split_and_auto_rule():
    assert split(7, 3) == [3, 2, 2] and split(2, 4) == [1, 1, 0, 0] and sum(split(601, 8)) == 601
    assert proportional(10, [3, 2, 2]) == [4, 3, 3] and sum(proportional(999, [5, 5, 4])) == 999
    # One worker per 64 streams, at most the usable cores - 1, at least 1.
    assert auto_workers("concurrency", [1, 64, 512], None, None, cpus=16) == 8
    assert auto_workers("concurrency", [600], None, None, cpus=4) == 3
    assert auto_workers("concurrency", [600], None, None, cpus=1) == 1
    assert auto_workers("concurrency", [8], None, None, cpus=16) == 1
    assert auto_workers("rate", [10, 200], None, None, cpus=16) == 7  # 2 s of arrivals at 200/s
    assert auto_workers("rate", [math.inf], 256, [1000], cpus=16) == 4  # the cap decides


def test_dealt_arrivals_are_the_global_gamma_process():
    """Round-robin dealing of ONE schedule: the merged arrivals equal the single-process schedule."""
    spec = LevelSpec("rate", 40.0, 500, burstiness=0.3, seed=7)
    reqs = iter([BenchRequest(f"p{i}", 1, 4) for i in range(500)])
    sched = arrival_schedule(spec, reqs)
    one = Source(spec, iter([BenchRequest("x", 1, 4)] * 500), time.perf_counter())

    async def single() -> list[float]:
        return [(await one.take())[1] for _ in range(500)]

    assert [t for _, t, _ in sched] == asyncio.run(single())
    dealt = [sched[w::3] for w in range(3)]  # what WorkerPool._plan gives 3 workers
    merged = sorted((t for d in dealt for _, t, _ in d))
    gaps = [b - a for a, b in zip(merged, merged[1:])]
    mean = sum(gaps) / len(gaps)
    cv = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean
    assert mean == pytest.approx(1 / 40, rel=0.15)
    assert cv == pytest.approx(1 / math.sqrt(0.3), rel=0.2)  # burstiness kept (independent streams would not)
    timed = arrival_schedule(LevelSpec("rate", 50.0, None, duration=2.0, seed=1), iter(lambda: BenchRequest("x", 1, 1), 0))
    assert timed and max(t for _, t, _ in timed) < 2.0 and len(timed) == pytest.approx(100, rel=0.35)


@pytest.fixture(scope="module")
def timed_server():
    with mock_server("--ttft", str(TTFT), "--itl", str(ITL)) as url:
        yield url


@pytest.fixture(scope="module")
def pool2():
    pool = WorkerPool(2, 30.0, None, 300)
    yield pool
    pool.close()


async def test_several_hundred_streams_across_workers_match_the_truth(timed_server, pool2):
    streams, total = 300, 600
    prompts = [f"many {i}" for i in range(total)]
    spec = LevelSpec("concurrency", streams, total)
    res = await pool2.run_level(spec, settings(timed_server), iter([BenchRequest(p, 2, N) for p in prompts]))
    assert res.failures == [] and not res.interrupted and len(res.raw) == 2
    level = finish_level(spec, res.records, res.raw, res.wall0, res.wall, None)
    s = summarize(level.records, level.duration)
    # Totals: every request once, all streams in flight together, exact token counts.
    assert s["completed"] == total and sorted(r.index for r in res.records) == list(range(total))
    assert s["output_tokens"] == total * N and s["max_concurrency"] == streams
    assert level.client["workers"] == 2 and len(level.client["worker_cpu_peak"]) == 2
    # Percentiles against what the server really did (merged raw records, not averaged per worker).
    actual = httpx.get(timed_server + "/mock/timings").json()
    truth = [actual[p] for p in prompts]
    true_ttft = [t["first"] for t in truth]
    true_itl = [b - a for t in truth for a, b in zip(t["chunks"], t["chunks"][1:])]
    true_tpot = [(t["last"] - t["first"]) / (N - 1) for t in truth]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert s["itl_ms"]["mean"] == pytest.approx(mean(true_itl) * 1000, rel=0.03)
    assert s["tpot_ms"]["mean"] == pytest.approx(mean(true_tpot) * 1000, rel=0.03)
    assert s["tpot_ms"]["p50"] == pytest.approx(percentile(true_tpot, 50) * 1000, rel=0.03)
    # TTFT/E2E as the user sees them: from the client's send to the server's write of the first/last chunk,
    # on the machine's one monotonic clock (a 300-request burst waits before the mock reads it: that counts).
    skew = time.perf_counter() - time.monotonic()  # 0 on Linux; the mock stamps with perf_counter
    by_index = {r.index: r for r in res.records}
    sent_at = [res.t0 + skew + by_index[i].start for i in range(total)]
    user_ttft = [t["first_at"] - s0 for t, s0 in zip(truth, sent_at)]
    user_e2e = [t["last_at"] - s0 for t, s0 in zip(truth, sent_at)]
    assert min(user_ttft) >= TTFT * 0.99 and max(true_ttft) < TTFT * 1.5
    for key, ref in (("ttft_ms", user_ttft), ("e2e_ms", user_e2e)):
        assert s[key]["mean"] == pytest.approx(mean(ref) * 1000, rel=0.03), key
        assert s[key]["p50"] == pytest.approx(percentile(ref, 50) * 1000, rel=0.03), key
        # P99 looser (8%, as nominal percentiles in test_bench_loadgen): on 2 shared cores a worker
        # descheduled for tens of ms adds that to its slowest reads.
        assert s[key]["p99"] == pytest.approx(percentile(ref, 99) * 1000, rel=0.08), key
    # Throughput: every token over the span from the shared start to the server's last write.
    assert s["output_throughput"] == pytest.approx(total * N / (max(t["last_at"] for t in truth) - res.t0 - skew),
                                                   rel=0.03)


async def test_rate_mode_across_workers_keeps_the_schedule(timed_server, pool2):
    spec = LevelSpec("rate", 30.0, 60, burstiness=0.5, seed=3)
    reqs = [BenchRequest(f"r{i}", 1, 3) for i in range(60)]
    want = [t for _, t, _ in arrival_schedule(spec, iter(reqs))]
    res = await pool2.run_level(spec, settings(timed_server), iter(reqs))
    assert [r.scheduled for r in res.records] == want  # global indices, global schedule
    assert all(r.success for r in res.records)
    assert max(r.start - r.scheduled for r in res.records) < 0.05  # each sent when scheduled
    level = finish_level(spec, res.records, res.raw, res.wall0, res.wall, None)
    assert "dispatch_lag_p99_ms" in level.client


async def test_worker_crash_reports_the_survivors_and_never_hangs(timed_server):
    pool = WorkerPool(2, 30.0, None, 8)
    try:
        spec = LevelSpec("concurrency", 8, 32)  # 4 waves of 1.5 s per worker
        reqs = [BenchRequest(f"crash {i}", 1, N) for i in range(32)]
        asyncio.get_running_loop().call_later(2.5, pool.procs[0].kill)
        res = await asyncio.wait_for(pool.run_level(spec, settings(timed_server), iter(reqs)), 40)
        assert len(res.failures) == 1 and "worker 0" in res.failures[0] and "died mid-level" in res.failures[0]
        assert "requests are missing" in res.failures[0]
        assert 16 <= len(res.records) < 32 and all(r.success for r in res.records)  # worker 1's 16, + flushed ones
        level = finish_level(spec, res.records, res.raw, res.wall0, res.wall, None, res.failures)
        assert level.client["client_bound"] and any("died" in w for w in level.client["warnings"])
        # The next level gets a fresh worker 0 and all its requests.
        again = await asyncio.wait_for(pool.run_level(LevelSpec("concurrency", 4, 4), settings(timed_server),
                                                      iter(reqs[:4])), 40)
        assert again.failures == [] and len(again.records) == 4
    finally:
        pool.close()
    assert not any(p.is_alive() for p in pool.procs)


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_stops_every_worker_and_prints_the_partial_table(timed_server, tmp_path, workers):
    data = tmp_path / "p.jsonl"
    data.write_text("\n".join(f'{{"prompt": "int {i}"}}' for i in range(4)))
    cmd = [sys.executable, "-m", "pagedserve.cli", "bench", "serve", "--url", timed_server, "--dataset",
           f"jsonl:{data}", "--output-len", str(N), "--concurrency", "4,8", "--num-prompts", "400",
           "--workers", str(workers), "--no-progress", "--warmup", "0", "--save-json", str(tmp_path / "r.json")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})
    pids = []
    if workers > 1:
        line = proc.stderr.readline()
        assert "worker processes (pids" in line, line
        pids = [int(x) for x in line.split("pids ")[1].rstrip(")\n").split(", ")]
    time.sleep(4.0)  # some requests of the first level complete (1.5 s each)
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted: partial results" in out and "Concurrency" in out and "Recommendation:" in out
    import json

    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["config"]["interrupted"] and len(doc["levels"]) == 1
    assert 4 <= len(doc["levels"][0]["requests"]) < 400  # what completed before Ctrl-C
    for pid in pids:  # every worker is gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_worker_pool_proportional_prompt_split_and_idle_workers(timed_server, pool2):
    """Fewer streams than workers: only as many workers as streams run; every prompt is sent once."""
    spec = LevelSpec("concurrency", 1, 3)
    reqs = [BenchRequest(f"few {i}", 1, 2) for i in range(3)]
    res = asyncio.run(pool2.run_level(spec, settings(timed_server), iter(reqs)))
    assert len(res.raw) == 1 and sorted(r.index for r in res.records) == [0, 1, 2]
    assert max(r.start for r in res.records) > 2.0  # one stream: one request after another


async def test_duration_mode_feeds_prompts_on_request(timed_server, pool2):
    spec = LevelSpec("concurrency", 6, None, duration=2.0)
    counter = iter(BenchRequest(f"dur {i}", 1, 2) for i in range(10_000))
    res = await pool2.run_level(spec, settings(timed_server), counter)
    idx = [r.index for r in res.records]
    assert len(idx) == len(set(idx)) and len(idx) >= 6  # 1.1 s requests: two waves start within 2 s
    assert max(r.start for r in res.records) < 2.0 + 0.1  # nothing sent after the duration


def test_stream_pool_is_reused_across_requests():
    """The lean client keeps connections alive: N sequential requests use one connection."""
    async def go(url: str) -> int:
        from pagedserve.bench.client import RequestRecord, build_body, send_request

        pool = StreamPool(1, 10.0)
        body = build_body(BenchRequest("x", 1, 2), "mock", "completions", False, 0.0)
        for _ in range(3):
            rec = await send_request(pool, url + "/v1/completions", body, RequestRecord(0), time.perf_counter(), 10)
            assert rec.success and rec.output_tokens == 2 and rec.send_delay is not None
        idle = [c for conns in pool.pool._idle.values() for c in conns]
        await pool.aclose()
        return len(idle), idle[0].used

    with mock_server("--ttft", "0.01", "--itl", "0.01") as url:
        assert asyncio.run(go(url)) == (1, 3)


