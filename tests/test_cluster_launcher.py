"""The launcher's supervisor with fast stand-in replicas (simulated backends as processes):
restart after a crash with the reason logged, rejoin, load timeout, clean stop."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time

import httpx

from pagedserve.cluster.launcher import Cluster
from pagedserve.cluster.router import RouterConfig


def consecutive_free_ports(n: int) -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65535:
            continue
        socks = []
        try:
            for i in range(n):
                t = socket.socket()
                socks.append(t)
                t.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise RuntimeError("no free port range")


def sim_replica(index: int, port: int) -> list[str]:
    return [sys.executable, "-m", "tests.doubles.sim_backends", "--num", "1", "--port", str(port),
            "--config", json.dumps({"token_time": 0.0005, "chunk_tokens": 4})]


async def wait_for(cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def gone(pid: int) -> bool:
    """Exited (a zombie waiting for a parent that does not reap counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


async def test_supervisor_restarts_a_killed_replica_which_rejoins(caplog):
    caplog.set_level(logging.INFO, logger="pagedserve")
    base = consecutive_free_ports(3)
    cluster = Cluster(2, "127.0.0.1", base, [], command=sim_replica, load_timeout=30,
                      router_config=RouterConfig(health_interval=0.1, admin_api_key="adm"))
    run = asyncio.create_task(cluster.run())
    pool = cluster.router.pool
    try:
        await wait_for(lambda: len(pool.healthy) == 2, 30)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{base}", timeout=10, trust_env=False) as client:
            seen = {(await client.post("/v1/completions", json={"model": "sim", "prompt": "p", "max_tokens": 3}))
                    .headers["x-pagedserve-backend"] for _ in range(6)}
            assert seen == {f"http://127.0.0.1:{base + 1}", f"http://127.0.0.1:{base + 2}"}
            victim = cluster.replicas[0]
            old_pid = victim.proc.pid
            os.kill(old_pid, signal.SIGKILL)
            await wait_for(lambda: victim.restarts == 1, 10)
            assert "replica 0 (pid %d) killed by SIGKILL" % old_pid in caplog.text
            # Meanwhile the other replica serves everything.
            for _ in range(3):
                r = await client.post("/v1/completions", json={"model": "sim", "prompt": "p", "max_tokens": 3})
                assert r.status_code == 200
            await wait_for(lambda: len(pool.healthy) == 2 and victim.proc.pid != old_pid, 30)
            listed = (await client.get("/admin/backends", headers={"authorization": "Bearer adm"})).json()["backends"]
            assert listed[0]["pid"] == victim.proc.pid and listed[0]["restarts"] == 1
    finally:
        pids = [r.proc.pid for r in cluster.replicas]
        cluster.request_stop(signal.SIGTERM)
        assert await asyncio.wait_for(run, 30) == 0
    assert all(gone(pid) for pid in pids)


async def test_replica_load_timeout_kills_and_retries(caplog):
    caplog.set_level(logging.INFO, logger="pagedserve")
    base = consecutive_free_ports(2)
    never_ready = lambda i, port: [sys.executable, "-c", "import time; print('loading forever', flush=True); time.sleep(60)"]  # noqa: E731
    cluster = Cluster(1, "127.0.0.1", base, [], command=never_ready, load_timeout=1.0,
                      router_config=RouterConfig(health_interval=0.2))
    run = asyncio.create_task(cluster.run())
    try:
        await wait_for(lambda: cluster.replicas[0].restarts >= 1, 15)
        assert "not ready within 1s (--replica-load-timeout)" in caplog.text
        assert "loading forever" in caplog.text  # its last output is in the log
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{base}", timeout=10, trust_env=False) as client:
            r = await client.post("/v1/completions", json={"model": "m", "prompt": "p"})
            assert r.status_code == 503 and "no healthy backend" in r.json()["error"]["message"]
            assert (await client.get("/health")).status_code == 503
    finally:
        pid = cluster.replicas[0].proc.pid
        cluster.request_stop(signal.SIGINT)
        await asyncio.wait_for(run, 30)
    assert gone(pid)


def test_replica_dies_with_a_killed_launcher(tmp_path):
    """A replica started through pagedserve.cluster.replica gets SIGTERM when its parent dies,
    even by SIGKILL (no orphans). The light `router` command stands in for `serve`."""
    import subprocess

    from pagedserve.ports import free_port

    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", f"""
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-m", "pagedserve.cluster.replica", str(os.getpid()), "router",
                          "--host", "127.0.0.1", "--port", "{free_port()}", "--log-level", "error"])
open({str(pid_file)!r}, "w").write(str(child.pid))
time.sleep(60)
"""])
    try:
        deadline = time.monotonic() + 20
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        child = int(pid_file.read_text())
        time.sleep(1.0)  # let it get going
        assert not gone(child)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 20
        while not gone(child):
            # reparented to init (or a subreaper) after the parent died: reap if we can
            assert time.monotonic() < deadline, "replica outlived its launcher"
            try:
                os.waitpid(child, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.1)
    finally:
        parent.kill()


_DEAD_ENGINE_REPLICA = r'''
import json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
t0 = time.monotonic()
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        dead = time.monotonic() - t0 > 1.5  # ready, then its engine "dies" and is not restarted
        body = json.dumps({"error": {"message": "the engine process died: engine process exited (exit code 1)",
                                     "type": "service_unavailable", "param": None, "code": 503}} if dead
                          else {"status": "ok"}).encode()
        self.send_response(503 if dead else 200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
print("replica up", flush=True)
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
'''


async def test_supervisor_restarts_a_live_replica_whose_engine_died(caplog):
    """The process is alive and answers, but /health says its engine is dead (and not restarting):
    the supervisor restarts it instead of leaving it at 503 for good (issue 14)."""
    caplog.set_level(logging.INFO, logger="pagedserve")
    base = consecutive_free_ports(2)
    cmd = lambda i, port: [sys.executable, "-c", _DEAD_ENGINE_REPLICA, str(port)]  # noqa: E731
    cluster = Cluster(1, "127.0.0.1", base, [], command=cmd, load_timeout=30, health_interval=0.2,
                      dead_engine_grace=0.5, router_config=RouterConfig(health_interval=0.2))
    run = asyncio.create_task(cluster.run())
    try:
        await wait_for(lambda: cluster.replicas[0].restarts >= 1, 20)
        assert "alive but its engine is dead and not restarting" in caplog.text
        await wait_for(lambda: cluster.replicas[0].ready, 20)  # the new process came up
    finally:
        pid = cluster.replicas[0].proc.pid
        cluster.request_stop(signal.SIGTERM)
        await asyncio.wait_for(run, 30)
    assert gone(pid)
