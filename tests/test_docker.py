"""The CPU image built and run for real, then the compose stack's `cpu` profile.

Needs a running dockerd (`.ci/run` installs docker.io and starts one); every
part that cannot run here skips, saying why. Without a registry the base image
comes from Debian's mirror (`deploy/offline/debian-base.sh`: debootstrap, then
`docker import`); `PAGEDSERVE_DOCKER_BASE=python:3.11-slim-bookworm` uses a
pulled one instead. torch's CPU wheel is served to the build from the host's
own pip (its configuration and caches) over a local index, since
download.pytorch.org may be out of reach. Run with `make test-docker`.
"""
from __future__ import annotations

import functools
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.docker, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CACHE = Path(os.environ.get("PAGEDSERVE_DOCKER_CACHE", Path.home() / ".cache" / "pagedserve" / "docker"))
IMAGE = "pagedserve:cpu"
PROM_IMAGE = "pagedserve-prometheus:debian"
PROJECT = "pagedserve-ci"
INDEX_PORT = 38765


def sh(*args: str, timeout: float = 1800, check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {r.returncode}:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


def wait_until(check, timeout: float, what: str, interval: float = 1.0):
    """Polls `check` (a callable returning a truthy value or raising) until it succeeds."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            got = check()
            if got:
                return got
            last = got
        except Exception as e:  # noqa: BLE001 - any failure means "not yet"
            last = e
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout:.0f} s (last: {last!r})")


@pytest.fixture(scope="module")
def docker() -> str:
    exe = shutil.which("docker")
    if exe is None:
        pytest.skip("no docker client (apt-get install docker.io; .ci/run does)")
    r = sh(exe, "info", "--format", "{{.ServerVersion}}", check=False, timeout=60)
    if r.returncode != 0:
        pytest.skip(f"dockerd is not running: {r.stderr.strip()[:200]}")
    return exe


@pytest.fixture(scope="module")
def base_image(docker) -> str:
    if base := os.environ.get("PAGEDSERVE_DOCKER_BASE"):
        return base
    if shutil.which("debootstrap") is None or os.geteuid() != 0:
        pytest.skip("no base image: debootstrap (run as root) makes one; or set PAGEDSERVE_DOCKER_BASE")
    env = {**os.environ, "PAGEDSERVE_DOCKER_CACHE": str(CACHE)}
    return sh(str(DEPLOY / "offline" / "debian-base.sh"), env=env).stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def torch_index():
    """A PEP 503 index on 127.0.0.1 holding the host's torch wheel and its dependencies.

    The host's pip resolves them (its configuration knows where CPU wheels live); the
    build reaches the index through `--network host`."""
    import torch

    wheels = CACHE / "wheels"
    version = torch.__version__
    if not list(wheels.glob(f"torch-{version}-*.whl")):
        sh(sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(wheels),
           f"torch=={version}")
    simple = CACHE / "simple"
    shutil.rmtree(simple, ignore_errors=True)
    for whl in wheels.glob("*.whl"):
        project = whl.name.split("-")[0].lower().replace("_", "-").replace(".", "-")
        (simple / project).mkdir(parents=True, exist_ok=True)
        (simple / project / whl.name).symlink_to(whl)
    handler = functools.partial(QuietHandler, directory=str(CACHE))
    # A fixed port where free: TORCH_INDEX is a build argument, and a new value rebuilds every layer.
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", INDEX_PORT), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/simple", version
    server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def cpu_image(docker, base_image, torch_index) -> str:
    index, version = torch_index
    t0 = time.monotonic()
    sh(docker, "build", "--network", "host", "-f", str(DEPLOY / "Dockerfile.cpu"),
       "--build-arg", f"BASE={base_image}", "--build-arg", f"TORCH_INDEX={index}",
       "--build-arg", f"TORCH_VERSION={version}", "-t", IMAGE, str(ROOT))
    print(f"built {IMAGE} in {time.monotonic() - t0:.0f} s")
    return IMAGE


def chat(port: int, model: str) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    r = client.chat.completions.create(model=model, max_tokens=8, temperature=0,
                                       messages=[{"role": "user", "content": "Say hi."}])
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens > 0
    return r.choices[0].message.content


def ready(port: int) -> bool:
    return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200


def test_cpu_image_serves_and_stops_cleanly(docker, cpu_image):
    port = free_port()
    name = f"pagedserve-ci-{port}"
    cid = sh(docker, "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000", cpu_image,
             "--host", "0.0.0.0", "--port", "8000", "--served-model-name", "default",
             "--shutdown-timeout", "20").stdout.strip()
    try:
        wait_until(lambda: ready(port), 300, "container /health 200")
        assert chat(port, "default")
        # The image's HEALTHCHECK runs deploy/healthcheck.py inside the container.
        wait_until(lambda: sh(docker, "inspect", "-f", "{{.State.Health.Status}}", cid).stdout.strip()
                   == "healthy", 60, "docker health status healthy")
        sh(docker, "stop", "-t", "30", cid, timeout=60)
        state = sh(docker, "inspect", "-f", "{{.State.ExitCode}} {{.State.OOMKilled}}", cid).stdout.split()
        assert state == ["0", "false"], f"exit code, OOM-killed: {state}\n{sh(docker, 'logs', cid).stderr[-3000:]}"
        logs = sh(docker, "logs", cid)
        assert "Traceback" not in logs.stdout + logs.stderr, logs.stderr[-3000:]
    finally:
        sh(docker, "rm", "-f", cid, check=False)


@pytest.fixture(scope="module")
def compose(docker) -> list[str]:
    for exe in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(exe[0]) and sh(*exe, "version", check=False).returncode == 0:
            return exe
    pytest.skip("no docker compose (apt-get install docker-compose; .ci/run does)")


def compose_file(compose: list[str], tmp_path: Path) -> str:
    """deploy/docker-compose.yml, or for Compose v1 (Debian bookworm's docker-compose 1.29) a copy
    without the top-level `name`, which v1 does not know (the project name is passed with -p)."""
    if compose != ["docker-compose"] or not sh("docker-compose", "version", "--short").stdout.startswith("1."):
        return str(DEPLOY / "docker-compose.yml")
    import yaml

    spec = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    spec.pop("name", None)
    out = tmp_path / "docker-compose.v1.yml"
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(out)


def test_compose_cpu_profile(docker, compose, cpu_image, base_image, tmp_path):
    """Two replicas, the router and Prometheus; a request through the router and a scrape.

    Grafana stays down: its image comes only from a registry, and nothing here reads it."""
    busy = [p for p in (8000, 8001, 8002, 9090) if not port_free(p)]
    if busy:
        pytest.skip(f"the compose file publishes fixed host ports, and {busy} are in use")
    sh(docker, "build", "--network", "host", "-f", str(DEPLOY / "offline" / "Dockerfile.prometheus"),
       "--build-arg", f"BASE={base_image}", "-t", PROM_IMAGE, str(DEPLOY / "offline"))
    env = {**os.environ, "PROMETHEUS_IMAGE": PROM_IMAGE, "PAGEDSERVE_CPU_THREADS": "1"}
    cmd = [*compose, "-f", compose_file(compose, tmp_path), "--project-directory", str(DEPLOY), "-p", PROJECT,
           "--profile", "cpu"]
    services = ["cpu-replica0", "cpu-replica1", "router-cpu", "prometheus-cpu"]
    try:
        sh(*cmd, "up", "-d", "--no-build", *services, env=env, timeout=300)
        for port in (8001, 8002):
            wait_until(lambda: ready(port), 300, f"replica on :{port} ready")
        # The router forwards once its own health checks have seen a ready backend.
        assert wait_until(lambda: chat(8000, "default"), 120, "a chat completion through the router")
        router_metrics = httpx.get("http://127.0.0.1:8000/metrics", timeout=10).text
        assert "pagedserve:router" in router_metrics

        def scraped() -> bool:
            r = httpx.get("http://127.0.0.1:9090/api/v1/query", params={"query": "up"}, timeout=10).json()
            up = {(s["metric"]["job"], s["metric"]["instance"]): s["value"][1] for s in r["data"]["result"]}
            want = {("pagedserve-replicas", "cpu-replica0:8000"), ("pagedserve-replicas", "cpu-replica1:8000"),
                    ("pagedserve-router", "router-cpu:8000")}
            return want <= {k for k, v in up.items() if v == "1"}

        wait_until(scraped, 90, "Prometheus scraping both replicas and the router", interval=3)

        def generated_tokens_scraped() -> bool:
            r = httpx.get("http://127.0.0.1:9090/api/v1/query",
                          params={"query": "sum(vllm:generation_tokens_total)"}, timeout=10).json()
            return r["status"] == "success" and float(r["data"]["result"][0]["value"][1]) > 0

        # The chat completion's tokens, once a scrape (every 10 s) has followed it.
        wait_until(generated_tokens_scraped, 60, "the generated tokens in Prometheus", interval=3)
    finally:
        logs = sh(*cmd, "logs", "--no-color", "--tail", "40", env=env, check=False, timeout=120)
        print(logs.stdout[-6000:])
        sh(*cmd, "down", "-v", "--timeout", "60", env=env, check=False, timeout=300)
