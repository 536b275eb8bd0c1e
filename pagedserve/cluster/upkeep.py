"""The router's upkeep of its backends, off the request path: the backends file, active health checks,
model lists and /metrics scrapes (engine load, GPU utilization) for the load-aware policies.

A mixin of `Router`, which owns the state these read and write (`pool`, `cfg`, `client`, `started`,
`_gpu`, `_file_mtime`, `_file_urls`); apart from router.py so the request path reads on its own.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time

import httpx

from pagedserve.cluster.backends import Backend, normalize_url
from pagedserve.cluster.scrape import parse_engine_metrics

log = logging.getLogger("pagedserve.router")


class BackendUpkeep:
    """Membership, health and load of the router's backends (see the module docstring)."""

    # ------------------------------------------------------------------ membership
    def add_backend(self, url: str, *, healthy: bool = False, **kw) -> Backend:
        """Add a backend; unless healthy=True it gets traffic after its first passing health check."""
        return self.pool.add(url, healthy=healthy, **kw)

    def remove_backend(self, url: str) -> Backend | None:
        return self.pool.remove(url)

    def _read_backends_file(self) -> None:
        path = self.cfg.backends_file
        try:
            mtime = os.stat(path).st_mtime
        except OSError as e:
            if self._file_mtime is not None:
                log.warning("backends file %s unreadable: %s (keeping the current backends)", path, e)
                self._file_mtime = None
            return
        if mtime == self._file_mtime:
            return
        self._file_mtime = mtime
        urls = set()
        with open(path) as f:
            for line in f:
                line = line.split("#", 1)[0].strip()
                if line:
                    try:
                        urls.add(normalize_url(line))
                    except ValueError as e:
                        log.warning("backends file %s: %s", path, e)
        for url in sorted(urls - self._file_urls):
            b = self.pool.get(url) or self.add_backend(url, healthy=False)
            if self.started:
                asyncio.ensure_future(self._check(b))
        for url in self._file_urls - urls:
            self.pool.remove(url)
        self._file_urls = urls

    async def _file_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.file_poll_interval)
            try:
                self._read_backends_file()
            except Exception as e:  # pragma: no cover
                log.warning("backends file: %s", e)

    # ------------------------------------------------------------------ health and load
    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(b) for b in self.pool.all), return_exceptions=True)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.health_interval)
            await self.check_all()

    async def _check(self, b: Backend) -> None:
        if self.client is None:
            return
        connect = False
        try:
            r = await self.client.get(b.url + self.cfg.health_path, timeout=self.cfg.health_timeout)
            ok = r.status_code == 200 or r.status_code == 404  # 404: a server without /health that answers
            reason = f"{self.cfg.health_path} answered {r.status_code}"
        except httpx.ConnectError:
            ok, connect, reason = False, True, "connection refused"
        except httpx.TimeoutException:
            ok, reason = False, f"{self.cfg.health_path} timed out"
        except httpx.HTTPError as e:
            ok, reason = False, f"{self.cfg.health_path}: {type(e).__name__}"
        if ok:
            was = b.healthy
            if self.pool.mark_up(b) and (not was or not b.models):
                await self._refresh_models(b)
        else:
            b.health_failures += 1
            # One refused connection or a 503 (not ready) is enough; a slow answer twice in a row.
            if b.healthy and (connect or "503" in reason or b.health_failures >= 2):
                self.pool.mark_down(b, reason)
            elif not b.healthy:
                b.reason = b.reason if b.ejected_until > time.monotonic() else reason

    async def _refresh_models(self, b: Backend) -> None:
        try:
            r = await self.client.get(b.url + "/v1/models", timeout=self.cfg.health_timeout)
            if r.status_code == 200:
                b.models = frozenset(m.get("id") for m in r.json().get("data", []) if isinstance(m, dict))
        except (httpx.HTTPError, ValueError, AttributeError):
            pass

    async def _scrape_loop(self) -> None:
        while True:
            try:
                await self.scrape_all()
            except Exception as e:  # pragma: no cover
                log.debug("scrape failed: %s", e)
            await asyncio.sleep(self.cfg.metrics_interval)

    async def scrape_all(self) -> None:
        local = {}
        if self._gpu is not None and self._gpu.available and any(b.gpu_index is not None for b in self.pool.all):
            local = await self._gpu.read()
        await asyncio.gather(*(self._scrape(b, local) for b in self.pool.healthy), return_exceptions=True)

    async def _scrape(self, b: Backend, local_gpu: dict) -> None:
        try:
            r = await self.client.get(b.url + "/metrics", timeout=self.cfg.health_timeout)
        except httpx.HTTPError:
            return
        if r.status_code != 200:
            return
        m = parse_engine_metrics(r.text)
        b.inflight_at_scrape = b.inflight
        b.metrics_time = time.monotonic()
        if "running" in m or "waiting" in m:
            b.running = m.get("running", 0.0)
            b.waiting = m.get("waiting", 0.0)
        if "kv_usage" in m:
            b.kv_usage = m["kv_usage"]
        if b.gpu_index is not None and b.gpu_index in local_gpu:
            b.gpu_util = local_gpu[b.gpu_index]
        elif "gpu_util" in m:
            b.gpu_util = m["gpu_util"]
