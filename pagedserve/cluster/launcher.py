"""`pagedserve serve --replicas N`: N replica servers, a supervisor, and the router.

- Replica i is `pagedserve serve` on 127.0.0.1:(base + i), base = --port + 1 unless
  --replica-base-port is given, with the same serve flags. On GPUs it gets one device via
  CUDA_VISIBLE_DEVICES (from the inherited CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`); on
  CPU the cores are split: each replica is pinned to its share and told its thread count
  through PAGEDSERVE_NUM_THREADS / OMP_NUM_THREADS.
- The router runs in this process on --host:--port and routes to ready replicas only.
- The supervisor restarts a replica that dies (exponential backoff 1 s .. 30 s, reset after a
  minute of good health), logs why it died (signal or exit code and its last output lines),
  and kills one that is not ready within --replica-load-timeout. A replica that is alive but
  no longer serves is restarted too: one whose /health reports a dead engine that it is not
  restarting itself (after a few seconds), or whose /health has not answered 200 for
  --replica-unhealthy-timeout seconds (a replica restarting its own engine gets that long).
- SIGINT / SIGTERM: stop the router, SIGTERM every replica's process group, SIGKILL what is
  left after a grace period. Replicas run in their own sessions (a terminal's Ctrl-C reaches
  only the launcher, which stops them in order) and get SIGTERM from the kernel should the
  launcher die without cleaning up.

The server CLI calls `add_cluster_args(parser)` and, when `args.replicas > 1`,
`run_cluster(args)`.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx

from pagedserve.cluster.policies import DEFAULT_POLICY, POLICIES
from pagedserve.cluster.tasks import cancel_tasks
from pagedserve.errors import ConfigError
from pagedserve.proc import describe_exit

log = logging.getLogger("pagedserve.launcher")

# Flags of `serve` that belong to the cluster (dropped from the replicas' command line), and
# whether each takes a value.
_CLUSTER_FLAGS = {"--replicas": True, "--data-parallel-size": True, "-dp": True, "--router-policy": True,
                  "--replica-base-port": True, "--replica-load-timeout": True, "--host": True, "--port": True,
                  "--replica-unhealthy-timeout": True, "--admin-api-key": True,
                  # the answer cache sits in the router, shared by all replicas
                  "--answer-cache": True, "--answer-cache-ttl": True, "--answer-cache-max-bytes": True,
                  "--answer-cache-max-entry-bytes": True, "--answer-cache-redis-url": True}


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    """Register --replicas / --data-parallel-size and the launcher's options on `serve`."""
    g = p.add_argument_group("data parallel")
    g.add_argument("--replicas", "--data-parallel-size", "-dp", dest="replicas", type=int, default=1,
                   help="run N replica servers (one per GPU; on CPU the cores are split) behind a router on --port")
    g.add_argument("--router-policy", default=DEFAULT_POLICY, choices=sorted(POLICIES),
                   help=f"routing policy with --replicas > 1 (default: {DEFAULT_POLICY})")
    g.add_argument("--replica-base-port", type=int, default=None, help="first replica port (default: --port + 1)")
    g.add_argument("--replica-load-timeout", type=float, default=600.0,
                   help="seconds a replica may take to become ready before it is killed and restarted")
    g.add_argument("--replica-unhealthy-timeout", type=float, default=120.0,
                   help="seconds a ready replica's /health may stay non-200 before it is killed and restarted")
    g.add_argument("--admin-api-key", default=None,
                   help="turn on the router's /admin/backends behind 'Authorization: Bearer KEY' "
                        "(default: $PAGEDSERVE_ADMIN_API_KEY; off without a key)")


def replica_argv(serve_argv: list[str]) -> list[str]:
    """The serve command line without the cluster's own flags (and without --host/--port)."""
    out, skip = [], False
    for a in serve_argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in _CLUSTER_FLAGS:
            skip = _CLUSTER_FLAGS[name] and "=" not in a
            continue
        out.append(a)
    return out


def _serve_argv_from_sys() -> list[str]:
    """`pagedserve [--debug] serve ARGS` -> ['--debug'?, 'serve', *ARGS] from sys.argv."""
    argv = sys.argv[1:]
    if "serve" in argv:
        i = argv.index("serve")
        return argv[:i] + ["serve"] + replica_argv(argv[i + 1:])
    return ["serve"] + replica_argv(argv)


def detect_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(l for l in out.splitlines() if l.startswith("GPU "))]


def plan_placement(n: int, gpus: list[str], cores: list[int], tp: int = 1) -> list[dict]:
    """Per replica: env additions, CPU cores to pin (CPU mode) and GPU index (GPU mode).

    With tensor parallelism each replica gets `tp` consecutive GPUs (its ranks' cuda:0..tp-1)."""
    plans = []
    if gpus and tp > 1:
        if n * tp > len(gpus):
            raise ConfigError(f"{n} replicas x tensor-parallel-size {tp} need {n * tp} GPUs but {len(gpus)} are visible",
                              hint="lower --replicas or --tensor-parallel-size, or make more GPUs visible")
        for i in range(n):
            mine = gpus[i * tp:(i + 1) * tp]
            plans.append({"env": {"CUDA_VISIBLE_DEVICES": ",".join(mine)}, "cores": None,
                          "gpu_index": int(mine[0]) if mine[0].isdigit() else None, "desc": f"GPUs {','.join(mine)}"})
        return plans
    if gpus:
        if n > len(gpus):
            log.warning("%d replicas on %d GPU(s): replicas will share GPUs (and their memory)", n, len(gpus))
        for i in range(n):
            dev = gpus[i % len(gpus)]
            plans.append({"env": {"CUDA_VISIBLE_DEVICES": dev}, "cores": None,
                          "gpu_index": int(dev) if dev.isdigit() else None, "desc": f"GPU {dev}"})
        return plans
    per = max(1, len(cores) // n)
    if n > len(cores):
        log.warning("%d replicas on %d CPU core(s): replicas will share cores", n, len(cores))
    for i in range(n):
        mine = cores[i * per:(i + 1) * per] if (i + 1) * per <= len(cores) else [cores[i % len(cores)]]
        threads = str(len(mine))
        plans.append({"env": {"CUDA_VISIBLE_DEVICES": "", "PAGEDSERVE_NUM_THREADS": threads, "OMP_NUM_THREADS": threads,
                              "MKL_NUM_THREADS": threads},
                      "cores": mine, "gpu_index": None, "desc": f"CPU cores {','.join(map(str, mine))}"})
    return plans


class Replica:
    def __init__(self, index: int, port: int, argv: list[str], plan: dict, command=None):
        self.index = index
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.cmd = (command(index, port) if command is not None else
                    [sys.executable, "-m", "pagedserve.cluster.replica", str(os.getpid()), *argv,
                     "--host", "127.0.0.1", "--port", str(port)])
        self.plan = plan
        self.proc: subprocess.Popen | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=15)
        self.restarts = 0
        self.started_at = 0.0
        self.ready = False

    def spawn(self) -> None:
        env = dict(os.environ, PAGEDSERVE_REPLICA_INDEX=str(self.index), PYTHONUNBUFFERED="1", **self.plan["env"])
        self.tail.clear()
        self.ready = False
        self.proc = subprocess.Popen(self.cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.started_at = time.monotonic()
        if self.plan["cores"] and hasattr(os, "sched_setaffinity"):
            try:
                os.sched_setaffinity(self.proc.pid, self.plan["cores"])
            except OSError as e:
                log.debug("could not pin replica %d: %s", self.index, e)
        threading.Thread(target=self._pump, args=(self.proc,), daemon=True, name=f"replica{self.index}-out").start()

    def _pump(self, proc: subprocess.Popen) -> None:
        prefix = f"[replica {self.index}] "
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            self.tail.append(line)
            try:
                sys.stderr.write(prefix + line + "\n")
            except (OSError, ValueError):
                pass
        proc.stdout.close()

    def signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)  # the replica and anything it started (engine core)
        except (ProcessLookupError, PermissionError):
            pass


class Cluster:
    def __init__(self, n: int, host: str, port: int, argv: list[str], *, policy: str = DEFAULT_POLICY,
                 base_port: int | None = None, load_timeout: float = 600.0, device: str = "auto",
                 grace_s: float = 15.0, command=None, router_config=None, answer_cache=None,
                 tp: int = 1, unhealthy_timeout: float = 120.0, dead_engine_grace: float = 3.0,
                 health_interval: float = 1.0):
        """`command(index, port) -> argv` replaces the replica command line (tests, other servers)."""
        from pagedserve.cluster.router import Router, RouterConfig

        self.host, self.port = host, port
        base = base_port if base_port is not None else port + 1
        gpus = [] if device == "cpu" else detect_gpus()
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
        plans = plan_placement(n, gpus, cores, tp)
        self.replicas = [Replica(i, base + i, argv, plans[i], command) for i in range(n)]
        self.load_timeout = load_timeout
        self.unhealthy_timeout = unhealthy_timeout
        self.dead_engine_grace = dead_engine_grace  # a replica that says its engine is dead, not restarting
        self.health_interval = health_interval
        self.grace_s = grace_s
        self.router = Router([], router_config or RouterConfig(policy=policy))
        self.answer_cache = answer_cache  # AnswerCacheConfig or None
        for r in self.replicas:
            self.router.add_backend(r.url, healthy=False, gpu_index=r.plan["gpu_index"])
        self.stopping = asyncio.Event()
        self.server = None
        self._force = False

    def request_stop(self, sig: int | None = None) -> None:
        if self.stopping.is_set():
            log.warning("second signal: killing replicas now")
            self._force = True
            for r in self.replicas:
                r.signal_group(signal.SIGKILL)
            return
        log.info("stopping (%s): router, then %d replica(s)",
                 signal.Signals(sig).name if sig else "requested", len(self.replicas))
        self.stopping.set()
        if self.server is not None:
            self.server.should_exit = True

    async def run(self) -> int:
        from pagedserve.answer_cache.middleware import wrap
        from pagedserve.cluster.uvicorn_server import Server, uvicorn_config

        app = wrap(self.router, self.answer_cache, self.router.registry)
        self.server = Server(uvicorn_config(app, self.host, self.port))
        for r in self.replicas:
            log.info("replica %d: %s on %s", r.index, r.url, r.plan["desc"])
        sup = [asyncio.create_task(self._supervise(r), name=f"supervise-{r.index}") for r in self.replicas]
        log.info("router on http://%s:%d, policy %s, %d replicas", self.host, self.port,
                 self.router.policy.name, len(self.replicas))
        try:
            await self.server.serve()
            if not self.stopping.is_set():  # the router failed (port taken?)
                log.error("router on %s:%d stopped; shutting the replicas down", self.host, self.port)
                self.stopping.set()
            return 0 if self.server.started else 1
        finally:
            self.stopping.set()
            await cancel_tasks(sup)
            await self._stop_replicas()

    async def _stop_replicas(self) -> None:
        live = [r for r in self.replicas if r.proc is not None and r.proc.poll() is None]
        for r in live:
            r.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while any(r.proc.poll() is None for r in live) and time.monotonic() < deadline and not self._force:
            await asyncio.sleep(0.1)
        for r in self.replicas:
            if r.proc is not None:
                if r.proc.poll() is None:
                    log.warning("replica %d did not stop within %.0fs: SIGKILL", r.index, self.grace_s)
                r.signal_group(signal.SIGKILL)  # also reaps anything left in its process group
                try:
                    r.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:  # pragma: no cover
                    pass
        log.info("all replicas stopped")

    async def _sleep_or_stop(self, seconds: float) -> bool:
        """Sleep; True if a stop was requested meanwhile."""
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
            return True
        except asyncio.TimeoutError:
            return False

    async def _supervise(self, r: Replica) -> None:
        backend = self.router.pool.get(r.url)
        backoff = 1.0
        async with httpx.AsyncClient(trust_env=False, timeout=2.0) as client:
            while not self.stopping.is_set():
                r.spawn()
                backend.meta.update(pid=r.proc.pid, restarts=r.restarts)
                log.info("replica %d starting (pid %d)", r.index, r.proc.pid)
                died = await self._wait_ready(r, client)
                if not died and r.ready:
                    log.info("replica %d ready on %s in %.1fs", r.index, r.url, time.monotonic() - r.started_at)
                    await self.router._check(backend)
                    why = await self._watch(r, client)
                    if why is None:
                        return
                else:
                    why = f"not ready within {self.load_timeout:.0f}s (--replica-load-timeout)"
                if self.stopping.is_set():
                    return
                rc = r.proc.poll()
                if rc is None:  # not ready in time, or not serving any more
                    r.signal_group(signal.SIGKILL)
                    r.proc.wait()
                else:
                    why = describe_exit(rc)
                    r.signal_group(signal.SIGKILL)  # leftovers of its process group
                self.router.pool.mark_down(backend, f"replica process {why}")
                uptime = time.monotonic() - r.started_at
                if uptime > 60:
                    backoff = 1.0
                tail = "\n    ".join(list(r.tail)[-10:]) or "(no output)"
                log.error("replica %d (pid %d) %s after %.1fs; restart #%d in %.0fs. Last output:\n    %s",
                          r.index, r.proc.pid, why, uptime, r.restarts + 1, backoff, tail)
                if await self._sleep_or_stop(backoff):
                    return
                backoff = min(30.0, backoff * 2)
                r.restarts += 1

    async def _watch(self, r: Replica, client: httpx.AsyncClient) -> str | None:
        """Watch a ready replica until it exits or stops serving; None when a stop was requested.
        Returns why it must be restarted (for an exited process: anything, the exit code is used)."""
        bad_since: float | None = None
        next_check = time.monotonic() + self.health_interval
        while r.proc.poll() is None:
            if await self._sleep_or_stop(0.2):
                return None
            now = time.monotonic()
            if now < next_check:
                continue
            next_check = now + self.health_interval
            verdict = await self._probe(r, client)
            if verdict == "ok":
                bad_since = None
                continue
            bad_since = bad_since or now
            if verdict == "engine_dead" and now - bad_since >= self.dead_engine_grace:
                return "alive but its engine is dead and not restarting (/health 503)"
            if now - bad_since >= self.unhealthy_timeout:
                return f"alive but /health not 200 for {self.unhealthy_timeout:.0f}s (--replica-unhealthy-timeout)"
        return "exited"

    @staticmethod
    async def _probe(r: Replica, client: httpx.AsyncClient) -> str:
        try:
            resp = await client.get(r.url + "/health")
        except httpx.HTTPError:
            return "down"
        if resp.status_code == 200:
            return "ok"
        text = resp.text
        if resp.status_code == 503 and "engine process died" in text and "restart" not in text.replace(
                "restart the server", ""):
            return "engine_dead"
        return "unhealthy"

    async def _wait_ready(self, r: Replica, client: httpx.AsyncClient) -> bool:
        """Poll the replica's /health until 200; True if it died (or a stop came) first."""
        deadline = r.started_at + self.load_timeout
        while time.monotonic() < deadline:
            if r.proc.poll() is not None or self.stopping.is_set():
                return True
            try:
                if (await client.get(r.url + "/health")).status_code == 200:
                    r.ready = True
                    return False
            except httpx.HTTPError:
                pass
            if await self._sleep_or_stop(0.5):
                return True
        return False


def run_cluster(args: argparse.Namespace, replicas: int | None = None, argv: list[str] | None = None) -> int:
    """Run `serve` as N replicas + router until SIGINT/SIGTERM. `argv` is the replicas'
    command line (default: this process's `serve ...` arguments without cluster flags)."""
    from pagedserve.cluster.router import RouterConfig
    from pagedserve.cluster.uvicorn_server import new_event_loop

    n = replicas if replicas is not None else args.replicas
    argv = argv if argv is not None else _serve_argv_from_sys()
    host, port = getattr(args, "host", "127.0.0.1") or "127.0.0.1", getattr(args, "port", 8000)
    base = getattr(args, "replica_base_port", None)
    from pagedserve.ports import check_port_free as _check_free

    _check_free(host, port, "router address")
    cache_cfg = None
    if getattr(args, "answer_cache", "off") != "off":
        from pagedserve.answer_cache.args import config_from_args

        cache_cfg = config_from_args(args)
    for i in range(n):
        _check_free("127.0.0.1", (base if base is not None else port + 1) + i, f"replica {i} address")
    cluster = Cluster(n, host, port,
                      argv, policy=getattr(args, "router_policy", DEFAULT_POLICY),
                      base_port=base,
                      load_timeout=getattr(args, "replica_load_timeout", 600.0),
                      device=getattr(args, "device", "auto") or "auto", answer_cache=cache_cfg,
                      tp=getattr(args, "tensor_parallel_size", 1) or 1,
                      unhealthy_timeout=getattr(args, "replica_unhealthy_timeout", 120.0),
                      router_config=RouterConfig(policy=getattr(args, "router_policy", DEFAULT_POLICY),
                                                 admin_api_key=getattr(args, "admin_api_key", None)
                                                 or os.environ.get("PAGEDSERVE_ADMIN_API_KEY") or None))
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, cluster.request_stop, sig)
    try:
        return loop.run_until_complete(cluster.run())
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        loop.close()
