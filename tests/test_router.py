"""The router against small in-process simulated OpenAI backends: pass-through, retries,
ejection, readmission, broken streams, no-backend 503, admin API, backends file, metrics."""
from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import openai
import pytest

from pagedserve.cluster.router import Router, RouterConfig
from pagedserve.cluster.uvicorn_server import start_server
from tests.doubles.sim_backends import SimBackend, SimConfig

FAST = SimConfig(token_time=0.0005, chunk_tokens=4, max_num_seqs=8)


class Cluster:
    def __init__(self):
        self.sims: list[SimBackend] = []
        self.servers: dict[int, tuple] = {}
        self.urls: list[str] = []
        self.router: Router | None = None
        self.router_server = None

    async def add_sim(self, port: int = 0, sim: SimBackend | None = None) -> SimBackend:
        sim = sim or SimBackend(FAST, name=f"sim{len(self.sims)}")
        server, task, port = await start_server(sim, "127.0.0.1", port, log_level="critical")
        if sim not in self.sims:
            self.sims.append(sim)
            self.urls.append(f"http://127.0.0.1:{port}")
        self.servers[self.sims.index(sim)] = (server, task, port)
        return sim

    async def stop_sim(self, i: int) -> None:
        server, task, _ = self.servers.pop(i)
        server.should_exit = True
        await task

    async def restart_sim(self, i: int) -> None:
        port = int(self.urls[i].rsplit(":", 1)[1])
        await self.add_sim(port, self.sims[i])

    async def start_router(self, **cfg) -> str:
        defaults = dict(health_interval=0.1, eject_base_s=0.2, metrics_interval=0.05)
        self.router = Router(self.urls, RouterConfig(**(defaults | cfg)))
        server, task, port = await start_server(self.router, "127.0.0.1", 0, log_level="critical")
        self.router_server = (server, task)
        return f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self.router_server:
            self.router_server[0].should_exit = True
            await self.router_server[1]
        for i in list(self.servers):
            await self.stop_sim(i)


@pytest.fixture
async def cluster():
    c = Cluster()
    yield c
    await c.close()


async def two(cluster: Cluster, **cfg) -> tuple[str, httpx.AsyncClient]:
    await cluster.add_sim()
    await cluster.add_sim()
    url = await cluster.start_router(**cfg)
    return url, httpx.AsyncClient(base_url=url, timeout=10, trust_env=False)


async def backends_hit(client: httpx.AsyncClient, requests: int = 6) -> set[str]:
    """The backends (from the x-pagedserve-backend header) that served `requests` small completions."""
    seen = set()
    for _ in range(requests):
        r = await client.post("/v1/completions", json={"model": "sim", "prompt": "p", "max_tokens": 2})
        seen.add(r.headers["x-pagedserve-backend"])
    return seen


async def stream_completion(client: httpx.AsyncClient, max_tokens: int = 12) -> tuple[int, list[str]]:
    events = []
    async with client.stream("POST", "/v1/completions",
                             json={"model": "sim", "prompt": "hello world", "max_tokens": max_tokens, "stream": True}) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
        return r.status_code, events


async def test_openai_client_streaming_and_models(cluster):
    url, client = await two(cluster)
    oai = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    models = await oai.models.list()
    assert [m.id for m in models.data] == ["sim"]  # merged, no duplicates
    out = await oai.completions.create(model="sim", prompt="a b c", max_tokens=10)
    assert out.usage.completion_tokens == 10 and out.choices[0].text == " x" * 10
    stream = await oai.chat.completions.create(model="sim", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=10, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == " x" * 10
    # Requests spread over both backends, and the backend is named in a header.
    assert await backends_hit(client) == set(cluster.urls)
    await client.aclose()


async def test_retry_on_503_with_retry_after_then_eject(cluster):
    """A 503 with Retry-After says "not ready, come back": the request did no work, so it is retried."""
    url, client = await two(cluster, failures_to_eject=3)
    cluster.sims[0].fail_status = 503
    cluster.sims[0].fail_retry_after = True
    for _ in range(8):
        r = await client.post("/v1/completions", json={"model": "sim", "prompt": "p", "max_tokens": 3})
        assert r.status_code == 200, r.text
        assert r.headers["x-pagedserve-backend"] == cluster.urls[1]
    b0 = cluster.router.pool.get(cluster.urls[0])
    assert not b0.healthy and "503" in b0.reason  # ejected after 3 consecutive 5xx
    metrics = (await client.get("/metrics")).text
    assert f'pagedserve:router_retries_total{{backend="{cluster.urls[0]}"}} 3.0' in metrics
    assert f'pagedserve:router_errors_total{{backend="{cluster.urls[0]}",kind="http_5xx"}} 3.0' in metrics
    # Fixed: the health check readmits it after the ejection period.
    cluster.sims[0].fail_status = None
    await wait_for(lambda: b0.healthy, 5)
    await client.aclose()


@pytest.mark.parametrize("status", [500, 503])
async def test_5xx_without_retry_after_is_relayed_not_retried(cluster, status):
    """A 5xx without Retry-After means the backend worked on the request and failed (e.g. its engine died
    under it): replaying it could take down the next backend too (a poison request)."""
    url, client = await two(cluster, failures_to_eject=100, policy="round_robin")
    cluster.sims[0].fail_status = status
    codes = []
    for _ in range(4):
        r = await client.post("/v1/completions", json={"model": "sim", "prompt": "p", "max_tokens": 3})
        codes.append(r.status_code)
        if r.status_code != 200:
            assert r.json()["error"]["code"] == status and r.headers["x-pagedserve-backend"] == cluster.urls[0]
    assert codes.count(status) == 2 and codes.count(200) == 2  # round robin: half went to the failing one
    assert cluster.sims[1].requests_seen == 2  # none of the failed ones was replayed on the healthy backend
    assert 'pagedserve:router_not_retried_total{reason="backend_5xx"} 2.0' in (await client.get("/metrics")).text
    await client.aclose()


async def test_request_caused_500s_never_eject_a_replica(cluster):
    """A 500 without Retry-After answers one body (a request that slipped past validation): ten of
    them in a row through a 2-replica router leave both replicas healthy and serving."""
    url, client = await two(cluster, failures_to_eject=3, policy="round_robin", eject_base_s=30.0)
    for sim in cluster.sims:
        sim.fail_status = 500
    for _ in range(10):
        r = await client.post("/v1/completions", json={"model": "sim", "prompt": "p", "max_tokens": 3})
        assert r.status_code == 500
    assert all(b.healthy for b in cluster.router.pool.all), [b.reason for b in cluster.router.pool.all]
    metrics = (await client.get("/metrics")).text
    assert 'kind="request_5xx"} 5.0' in metrics and 'kind="http_5xx"' not in metrics
    for sim in cluster.sims:
        sim.fail_status = None
    assert await backends_hit(client) == set(cluster.urls)
    await client.aclose()


async def test_reset_before_first_byte_of_a_lone_request_is_not_replayed(cluster):
    """A backend whose connection breaks under the only request it has may have been broken by that
    request: answered 502 (OpenAI JSON), not replayed on the next backend."""
    url, client = await two(cluster, failures_to_eject=100, policy="round_robin")
    cluster.sims[0].drop_before_first_chunk = True  # headers sent, then the connection drops
    results = [await stream_completion(client) for _ in range(4)]
    assert sorted(s for s, _ in results) == [200, 200, 502, 502]
    for status, events in results:
        if status == 200:
            assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1])
    assert cluster.sims[1].requests_seen == 2
    assert 'pagedserve:router_not_retried_total{reason="poison_suspect"} 2.0' in (await client.get("/metrics")).text
    await client.aclose()


async def test_broken_stream_ends_with_error_event(cluster):
    url, client = await two(cluster)
    for s in cluster.sims:
        s.break_after_chunks = 1
    status, events = await stream_completion(client, max_tokens=40)
    assert status == 200
    assert json.loads(events[0])["choices"][0]["text"] == " x"
    err = json.loads(events[-2])["error"]
    assert err["code"] == 502 and "mid-stream" in err["message"] and events[-1] == "[DONE]"
    # The openai client surfaces it as an error, not a silently short answer.
    oai = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIError, match="mid-stream"):
        async for _ in await oai.completions.create(model="sim", prompt="p", max_tokens=40, stream=True):
            pass
    await client.aclose()


async def test_connect_error_ejects_then_readmits_after_recovery(cluster):
    url, client = await two(cluster)
    await cluster.stop_sim(0)
    for _ in range(6):  # the first may hit the dead backend: it is retried on the other one
        status, events = await stream_completion(client)
        assert status == 200 and events[-1] == "[DONE]"
    b0 = cluster.router.pool.get(cluster.urls[0])
    assert not b0.healthy
    await cluster.restart_sim(0)
    await wait_for(lambda: b0.healthy, 5)
    assert await backends_hit(client) == set(cluster.urls)
    await client.aclose()


async def test_no_healthy_backend_503(cluster):
    url, client = await two(cluster)
    await cluster.stop_sim(0)
    await cluster.stop_sim(1)
    r = await client.post("/v1/chat/completions", json={"model": "sim", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code in (502, 503)  # the first request may still find them "healthy" and fail over
    await wait_for(lambda: not cluster.router.pool.healthy, 5)
    r = await client.post("/v1/chat/completions", json={"model": "sim", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    err = r.json()["error"]
    assert err["code"] == 503 and err["type"] == "service_unavailable" and "no healthy backend" in err["message"]
    assert (await client.get("/health")).status_code == 503
    assert (await client.get("/v1/models")).status_code == 503
    oai = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError, match="no healthy backend"):
        await oai.completions.create(model="sim", prompt="p", max_tokens=2)
    await client.aclose()


async def test_client_disconnect_aborts_upstream(cluster):
    url, client = await two(cluster)
    async with client.stream("POST", "/v1/completions",
                             json={"model": "sim", "prompt": "p", "max_tokens": 100000, "stream": True}) as r:
        async for _ in r.aiter_raw():
            break
    await wait_for(lambda: all(not s.running for s in cluster.sims), 5)
    await wait_for(lambda: all(b.inflight == 0 for b in cluster.router.pool.all), 5)
    await client.aclose()


async def test_admin_add_remove_and_auth(cluster):
    await cluster.add_sim()
    url = await cluster.start_router(admin_api_key="sekret")
    spare = await cluster.add_sim()  # running, but not known to the router yet
    spare_url = cluster.urls[1]
    async with httpx.AsyncClient(base_url=url, timeout=10, trust_env=False) as client:
        assert (await client.post("/admin/backends", json={"url": spare_url})).status_code == 401
        auth = {"authorization": "Bearer sekret"}
        r = await client.post("/admin/backends", json={"url": spare_url}, headers=auth)
        assert r.status_code == 201 and r.json()["healthy"]
        listed = (await client.get("/admin/backends", headers=auth)).json()
        assert listed["policy"] and {b["url"] for b in listed["backends"]} == {cluster.urls[0], spare_url}
        for _ in range(4):
            await client.post("/v1/completions", json={"model": "sim", "prompt": "p", "max_tokens": 2})
        assert spare.requests_seen >= 1
        assert (await client.request("DELETE", "/admin/backends", json={"url": spare_url}, headers=auth)).status_code == 200
        before = spare.requests_seen
        for _ in range(4):
            await client.post("/v1/completions", json={"model": "sim", "prompt": "p", "max_tokens": 2})
        assert spare.requests_seen == before
        assert (await client.request("DELETE", "/admin/backends?url=" + spare_url, headers=auth)).status_code == 404


async def test_backends_file_is_watched(cluster, tmp_path):
    await cluster.add_sim()
    await cluster.add_sim()
    path = tmp_path / "backends.txt"
    path.write_text(f"# replicas\n{cluster.urls[0]}\n")
    router = Router([], RouterConfig(backends_file=str(path), file_poll_interval=0.05, health_interval=0.1))
    server, task, port = await start_server(router, "127.0.0.1", 0, log_level="critical")
    try:
        assert [b.url for b in router.pool.healthy] == [cluster.urls[0]]
        path.write_text(f"{cluster.urls[1]}  # swapped\n")
        await wait_for(lambda: [b.url for b in router.pool.healthy] == [cluster.urls[1]], 5)
    finally:
        server.should_exit = True
        await task


async def test_engine_load_scrapes_backend_metrics(cluster):
    url, client = await two(cluster, policy="engine_load")
    tasks = [asyncio.create_task(client.post("/v1/completions", json={"model": "sim", "prompt": "p", "max_tokens": 400}))
             for _ in range(4)]
    await wait_for(lambda: any((b.running or 0) > 0 for b in cluster.router.pool.all), 5)
    await asyncio.gather(*tasks)
    assert sorted(s.requests_seen for s in cluster.sims) == [2, 2]
    metrics = (await client.get("/metrics")).text
    for name in ("pagedserve:router_requests_total", "pagedserve:router_backend_healthy",
                 "pagedserve:router_routing_latency_seconds_bucket", "pagedserve:router_backend_inflight"):
        assert name in metrics
    health = (await client.get("/health")).json()
    assert health == {"status": "ok", "healthy_backends": 2, "backends": 2}
    await client.aclose()


async def wait_for(cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def test_router_command_line(cluster, tmp_path):
    """`pagedserve router` as a process: flags, /health, a routed request, clean exit on SIGTERM."""
    import signal
    import subprocess
    import sys

    from pagedserve.ports import free_port

    await cluster.add_sim()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pagedserve.cli", "router", "--host", "127.0.0.1", "--port", str(port),
                             "--backend", cluster.urls[0], "--policy", "round_robin", "--health-check-interval", "0.2",
                             "--log-level", "warning"], env={**os.environ, "PAGEDSERVE_ADMIN_API_KEY": "adm"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10, trust_env=False) as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if (await client.get("/health")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline and proc.poll() is None
                await asyncio.sleep(0.1)
            admin = {"authorization": "Bearer adm"}
            assert (await client.get("/admin/backends", headers=admin)).json()["policy"] == "round_robin"
            status, events = await stream_completion(client)
            assert status == 200 and events[-1] == "[DONE]"
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=20)[0].decode()
    assert proc.returncode == 0, out


async def test_gpu_util_reads_local_gpus_through_nvidia_smi(cluster, tmp_path, monkeypatch):
    """gpu_util on local replicas: utilization per GPU index from nvidia-smi (a stand-in script)."""
    import os

    from pagedserve.cluster.launcher import detect_gpus
    from pagedserve.cluster.policies import RequestInfo

    smi = tmp_path / "nvidia-smi"
    smi.write_text('#!/bin/sh\nif [ "$1" = "-L" ]; then echo "GPU 0: H100 (UUID: GPU-a)"; echo "GPU 1: H100 (UUID: GPU-b)";'
                   ' exit 0; fi\necho "0, 97"\necho "1, 12"\n')
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert detect_gpus() == ["0", "1"]
    await cluster.add_sim()
    await cluster.add_sim()
    router = Router([], RouterConfig(policy="gpu_util"))
    b0 = router.add_backend(cluster.urls[0], healthy=True, gpu_index=0)
    b1 = router.add_backend(cluster.urls[1], healthy=True, gpu_index=1)
    await router.start()
    try:
        await router.scrape_all()
        assert (b0.gpu_util, b1.gpu_util) == (97.0, 12.0)
        assert router.policy.choose(RequestInfo(), router.pool.healthy) is b1
    finally:
        await router.stop()


async def test_stop_ends_a_loop_task_that_lost_a_cancellation():
    """Router.stop() (and the launcher) end their loop tasks with cancel_tasks, which cancels again while a
    task runs on. On Python < 3.12 `asyncio.wait_for` can drop a cancellation that lands as its awaitable
    completes, and the router's scrape loop (nvidia-smi under wait_for) then kept looping: stop() hung until
    the test timeout. Here a loop swallows its first cancellation, as wait_for can; a task that failed
    before the stop must not disturb it either."""
    from pagedserve.cluster.tasks import cancel_tasks

    lost = []

    async def loop():
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if not lost:
                    lost.append(True)
                    continue
                raise

    async def failed():
        raise ValueError("failed before the stop")

    router = Router([], RouterConfig())
    router._tasks = [asyncio.create_task(loop()), asyncio.create_task(failed())]
    await asyncio.sleep(0.01)
    stop = asyncio.create_task(router.stop())
    done, _ = await asyncio.wait({stop}, timeout=5)  # asyncio.wait never cancels, so a hang shows as a hang
    if not done:
        stop.cancel()
    assert done and lost and router._tasks == []
