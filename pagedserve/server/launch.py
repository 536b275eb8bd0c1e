"""Start `pagedserve serve` as a child process and wait for it: for tests, benchmarks and scripts.

    with ServerProcess(["--max-model-len", "512"]) as srv:
        httpx.get(srv.url + "/v1/models")
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx

from pagedserve.ports import free_port


class ServerProcess:
    def __init__(self, args: list[str] | None = None, port: int | None = None, env: dict | None = None,
                 model: str | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "pagedserve.cli", "serve", *([model] if model else []),
                    "--host", "127.0.0.1", "--port", str(self.port), *(args or [])]
        self.env = {**os.environ, **(env or {})}
        self.log = tempfile.NamedTemporaryFile("w+", prefix="pagedserve-serve-", suffix=".log", delete=False)
        self.proc: subprocess.Popen | None = None
        self.health_seen: list[int] = []  # /health statuses observed while waiting (0: connection refused)

    def start(self) -> "ServerProcess":
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        return self

    def wait_ready(self, timeout: float = 300.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with code {self.proc.returncode}:\n{self.output()}")
                try:
                    code = client.get(self.url + "/health").status_code
                except httpx.HTTPError:
                    code = 0
                if not self.health_seen or self.health_seen[-1] != code:
                    self.health_seen.append(code)
                if code == 200:
                    return self
                time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout:.0f}s:\n{self.output()}")

    def output(self, last: int = 60) -> str:
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            return "".join(f.readlines()[-last:])

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful drain) and wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start().wait_ready()

    def __exit__(self, *exc) -> None:
        self.terminate()
        self.log.close()
        os.unlink(self.log.name)
