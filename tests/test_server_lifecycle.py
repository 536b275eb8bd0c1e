"""Server lifecycle: queue overflow (429, then recovery), engine-process death (503, in-flight
requests fail instead of hanging), SIGTERM after death, and start-up failures that exit non-zero.

A small server of one slot (max_num_seqs=1) and a queue of 2 makes overflow easy to reach.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from pagedserve.ports import free_port
from tests.servers import running_server

C = "/v1/completions"


@pytest.fixture(scope="module")
def server():
    with running_server(["--max-model-len", "256", "--max-num-seqs", "1", "--max-queue-len", "2",
                         "--kv-cache-memory", "0.05", "--disable-log-requests"]) as srv:
        yield srv


def _metric(url: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in fam.samples:
            if s.name == name:
                total += s.value
    return total


async def test_queue_overflow_429_then_recovery(server):
    body = {"prompt": "Count slowly:", "max_tokens": 8, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=server.url, timeout=300) as c:
        rs = await asyncio.gather(*(c.post(C, json=body) for _ in range(6)))
        codes = sorted(r.status_code for r in rs)
        assert set(codes) == {200, 429}, codes
        assert codes.count(200) >= 2  # one running + the queue's worth were accepted
        r429 = next(r for r in rs if r.status_code == 429)
        err = r429.json()["error"]
        assert err["type"] == "rate_limit_error" and err["code"] == 429 and "max-queue-len" in err["message"]
        assert int(r429.headers["Retry-After"]) >= 1
        for r in rs:
            if r.status_code == 200:
                assert r.json()["usage"]["completion_tokens"] == 8
        # Recovery: the queue drained, so new requests are accepted again.
        again = await asyncio.gather(*(c.post(C, json=body) for _ in range(2)))
        assert [r.status_code for r in again] == [200, 200]
    assert _metric(server.url, "vllm:num_requests_waiting") == 0
    assert _metric(server.url, "pagedserve:requests_rejected_total") >= 1


async def test_engine_death_fails_requests_and_health(server):
    pid = httpx.get(server.url + "/health", timeout=30).json()["engine_pid"]
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
        # A queued non-streaming request and a running stream are both in flight when the engine dies.
        stream_body = {"prompt": "Tell me a long story.", "max_tokens": 200, "ignore_eos": True, "stream": True}
        async with c.stream("POST", C, json=stream_body) as r:
            lines = r.aiter_lines()
            async for line in lines:
                if line.startswith("data: "):
                    break
            queued = asyncio.create_task(c.post(C, json={"prompt": "Hi", "max_tokens": 8}))
            await asyncio.sleep(0.3)
            os.kill(pid, signal.SIGKILL)
            t0 = time.monotonic()
            rest = [line async for line in lines if line.startswith("data: ")]
        assert time.monotonic() - t0 < 30
        assert rest[-1] == "data: [DONE]"
        err = json.loads(rest[-2][6:])["error"]
        assert err["code"] == 503 and "died" in err["message"]
        q = await asyncio.wait_for(queued, 30)
        assert q.status_code == 503 and "died" in q.json()["error"]["message"]
        # The server stays up, says it is unhealthy, and refuses new work with 503 while it starts a new
        # engine (tests/test_robustness.py waits for the restart).
        h = await c.get("/health")
        assert h.status_code == 503 and "died" in h.json()["error"]["message"]
        r = await c.post(C, json={"prompt": "Hi"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 503
    assert _metric(server.url, "pagedserve:engine_up") == 0
    assert _metric(server.url, "vllm:num_requests_running") == 0


def test_sigterm_after_engine_death_exits_zero(server):
    assert server.terminate() == 0


def _run_serve(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pagedserve.cli", "serve", *args, "--port", str(free_port())],
                          capture_output=True, text=True, timeout=timeout)


def test_bad_model_path_exits_with_one_line():
    r = _run_serve("/nonexistent/model-dir")
    assert r.returncode == 1
    assert "error: model path '/nonexistent/model-dir' does not exist" in r.stderr
    assert "Traceback" not in r.stderr


def test_engine_load_failure_exits_nonzero():
    r = _run_serve("--max-model-len", "100000")
    assert r.returncode == 1, r.stderr[-2000:]
    assert "exceeds the model's context length" in r.stderr
    assert "Traceback" not in r.stderr
