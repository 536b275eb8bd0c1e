"""Routing-policy study: which policy should the router use by default?

Four simulated continuous-batching GPU backends (tests.doubles.sim_backends: per-step time grows
with the batch, bounded batch, FIFO queue, vLLM-named /metrics, a GPU-utilization reading
that saturates at 100%) run in one process, the router (`pagedserve router --policy P`) in
another, and this process drives them with streamed /v1/completions requests.

1. Long-tail workload (the seed's): prompts of 50-300 tokens, outputs of 50-500 tokens drawn
   log-uniformly (many short answers, a few long ones), Poisson arrivals at rising fractions
   of the cluster's capacity. Same seeded requests for every policy. P50/P99 TTFT and E2E.
2. Shared-prefix workload: requests share one of G long system prompts; the backends have a
   prefix cache smaller than all G prompts together. Prefix-cache hit rate, TTFT, E2E.

Time is scaled down (default 1 ms per decode step of one sequence), so it runs in minutes on
a laptop. Prints tables and writes JSON (--out).

    python benchmarks/router_policies.py            # full study (~4 min on 2 cores)
    python benchmarks/router_policies.py --quick    # smoke run (~1 min)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pagedserve.cluster.policies import DEFAULT_POLICY  # noqa: E402
from tests.doubles.sim_backends import SimConfig  # noqa: E402
from pagedserve.ports import free_port  # noqa: E402

POLICIES = ["round_robin", "gpu_util", "least_outstanding", "engine_load", "prefix_affinity"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), 0 elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# ---------------------------------------------------------------------- processes
class Sims:
    def __init__(self, n: int, cfg: dict):
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.doubles.sim_backends", "--num", str(n),
                                      "--config", json.dumps(cfg)], stdout=subprocess.PIPE, cwd=ROOT)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("simulated backends failed to start")
        self.urls = json.loads(line)["urls"]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class RouterProc:
    def __init__(self, urls: list[str], policy: str, extra: list[str] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "pagedserve.cli", "router", "--host", "127.0.0.1", "--port", str(self.port),
               "--policy", policy, "--log-level", "warning", *extra]
        for u in urls:
            cmd += ["--backend", u]
        self.proc = subprocess.Popen(cmd, cwd=ROOT)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("router did not start")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# ---------------------------------------------------------------------- workloads
def words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(50000)}" for _ in range(n))


def long_tail(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        out_len = int(round(math.exp(rng.uniform(math.log(50), math.log(500)))))
        out.append({"prompt": words(rng, rng.randint(50, 300)), "max_tokens": out_len})
    return out


def shared_prefix(rng: random.Random, n: int, groups: int, prefix_len: int) -> list[dict]:
    systems = [words(random.Random(1000 + g), prefix_len) for g in range(groups)]
    return [{"prompt": systems[rng.randrange(groups)] + " " + words(rng, rng.randint(16, 48)),
             "max_tokens": rng.randint(20, 60)} for _ in range(n)]


async def drive(url: str, reqs: list[dict], rate: float, seed: int) -> dict:
    """Poisson arrivals at `rate`; every request streamed; TTFT = first body bytes (the router
    and the backends send the first bytes with the first token)."""
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=2000)
    ttft, e2e, errors = [], [], 0
    async with httpx.AsyncClient(timeout=120, limits=limits, trust_env=False) as client:
        async def one(req):
            nonlocal errors
            body = {"model": "sim", "stream": True, **req}
            t0 = time.perf_counter()
            first = None
            last = b""
            try:
                async with client.stream("POST", url + "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        errors += 1
                        return
                    async for chunk in r.aiter_raw():
                        if first is None:
                            first = time.perf_counter() - t0
                        last = chunk
                if not last.endswith(b"data: [DONE]\n\n") or b'"error"' in last:
                    errors += 1
                    return
                ttft.append(first)
                e2e.append(time.perf_counter() - t0)
            except httpx.HTTPError:
                errors += 1

        tasks = []
        start = time.perf_counter()
        t = 0.0
        for req in reqs:
            t += rng.expovariate(rate)
            delay = start + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(req)))
        sent_for = time.perf_counter() - start
        await asyncio.gather(*tasks)
    return {"n": len(reqs), "errors": errors, "offered_rps": rate, "achieved_rps": len(reqs) / sent_for,
            "ttft_p50_ms": 1e3 * pct(ttft, 0.5), "ttft_p99_ms": 1e3 * pct(ttft, 0.99),
            "ttft_mean_ms": 1e3 * statistics.fmean(ttft) if ttft else float("nan"),
            "e2e_p50_ms": 1e3 * pct(e2e, 0.5), "e2e_p99_ms": 1e3 * pct(e2e, 0.99)}


def sim_stats(urls: list[str]) -> list[dict]:
    return [httpx.get(u + "/sim/stats", timeout=5, trust_env=False).json() for u in urls]


def reset_sims(urls: list[str]) -> None:
    for u in urls:
        httpx.post(u + "/sim/reset", timeout=5, trust_env=False)


def wait_idle(urls: list[str], timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if all(s["running"] == 0 and s["waiting"] == 0 for s in sim_stats(urls)):
            return
        time.sleep(0.1)


def capacity_rps(cfg: SimConfig, mean_out: float, mean_prompt: float, n: int) -> float:
    """Requests/s a full batch sustains per backend x n (decode-bound, plus prefill)."""
    b = cfg.max_num_seqs
    step = cfg.token_time * (1 + cfg.batch_slowdown * (b - 1))
    per_req = mean_out * step / b + mean_prompt * cfg.prefill_time_per_token
    return n / per_req


# ---------------------------------------------------------------------- virtual time
class Oracle:
    """Reference only (virtual time): sees every backend's true state and sends the request
    where a batch slot frees first (free slot now, else the (waiting+1)-th shortest remaining
    generation). Not a deployable policy: it bounds what any router could gain."""

    def __init__(self, sims):
        self.sims = sims

    def choose(self, req, candidates):
        def wait_score(i):
            s = self.sims[i]
            if len(s.running) < s.cfg.max_num_seqs and not s.waiting:
                return len(s.running) / 100 - 1
            rem = sorted([r.max_tokens - r.generated for r in s.running] + [r.max_tokens for r in s.waiting])
            return rem[min(len(s.waiting), len(rem) - 1)] + len(s.running) / 100
        return candidates[min(range(len(candidates)), key=wait_score)]


def run_virtual(policy_name: str, cfg: SimConfig, reqs: list[dict], rate: float, seed: int, n_backends: int = 4,
                scrape_interval: float = 0.25, routers: int = 1) -> dict:
    """The same backends and policies in a discrete-event simulation (virtual time, no HTTP):
    SimBackend's batching/queue/prefix-cache model steps exactly, the real policy classes
    route, and engine metrics / GPU utilization are 'scraped' every `scrape_interval`. Free of
    the CPU noise of a shared machine, so loads and seeds can be compared exactly. With
    routers > 1, requests alternate between independent routers (each sees only its own
    in-flight requests; scraped metrics are the same for all)."""
    import heapq

    from pagedserve.cluster.backends import Backend
    from pagedserve.cluster.policies import RequestInfo, make_policy
    from tests.doubles.sim_backends import SimBackend, _Req

    name, _, kw = policy_name.partition(":")  # "least_outstanding:token_weight=0" for tuning
    sims = [SimBackend(cfg, name=f"v{i}") for i in range(n_backends)]
    kwargs = {k: float(v) for k, v in (a.split("=") for a in kw.split(",") if a)}
    views = [[Backend(f"http://v{i}:1") for i in range(n_backends)] for _ in range(routers)]
    pols = [Oracle(sims) if name == "oracle" else make_policy(name, **kwargs) for _ in range(routers)]
    busy_since: list[float | None] = [None] * n_backends
    busy_log: list[list] = [[] for _ in range(n_backends)]
    stepping = [False] * n_backends
    meta: dict[int, list] = {}  # req id -> [arrival, backend, est tokens, first-token time, router]
    ttft, e2e = [], []
    counts = [0] * n_backends
    rng = random.Random(seed)
    heap, seq = [], 0
    t = 0.0
    for i in range(len(reqs)):
        t += rng.expovariate(rate)
        heap.append((t, seq, 0, i))
        seq += 1
    last_arrival = t
    heap.append((0.0, seq, 2, 0))
    heapq.heapify(heap)

    def util(i: int, now: float) -> float:
        lo = now - cfg.util_window
        log_ = busy_log[i]
        while log_ and log_[0][1] < lo:
            log_.pop(0)
        busy = sum(min(e, now) - max(s, lo) for s, e in log_ if e > lo)
        if busy_since[i] is not None:
            busy += now - max(busy_since[i], lo)
        return min(100.0, 100.0 * busy / cfg.util_window)

    def start_step(i: int, now: float) -> None:
        nonlocal seq
        sim = sims[i]
        prefill = sim._admit()
        if not sim.running:
            stepping[i] = False
            if busy_since[i] is not None:
                busy_log[i].append((busy_since[i], now))
                busy_since[i] = None
            return
        if busy_since[i] is None:
            busy_since[i] = now
        stepping[i] = True
        seq += 1
        heapq.heappush(heap, (now + sim._step_time(prefill), seq, 1, i))

    while heap:
        now, _, kind, x = heapq.heappop(heap)
        if kind == 0:  # arrival
            req = reqs[x]
            words_ = req["prompt"].split()
            info = RequestInfo(prompt_tokens=len(words_), max_tokens=req["max_tokens"], affinity_key=req["prompt"][:256])
            k = x % routers
            bks = views[k]
            b = pols[k].choose(info, bks)
            i = bks.index(b)
            counts[i] += 1
            b.inflight += 1
            b.inflight_tokens += info.est_tokens
            r = _Req(words_, req["max_tokens"])
            meta[r.id] = [now, i, info.est_tokens, None, k]
            sims[i].waiting.append(r)
            if not stepping[i]:
                start_step(i, now)
        elif kind == 1:  # step end on backend x
            sim = sims[x]
            batch = list(sim.running)
            sim._advance(1)
            for r in batch:
                m = meta[r.id]
                if m[3] is None:
                    m[3] = now
                    ttft.append(now - m[0])
                if r.generated >= r.max_tokens:
                    e2e.append(now - m[0])
                    b = views[m[4]][m[1]]
                    b.inflight -= 1
                    b.inflight_tokens -= m[2]
                    del meta[r.id]
            start_step(x, now)
        else:  # metrics scrape
            for i, sim in enumerate(sims):
                u = util(i, now)
                for bks in views:
                    b = bks[i]
                    b.running, b.waiting = float(len(sim.running)), float(len(sim.waiting))
                    b.kv_usage = sim.kv_used / cfg.kv_capacity_tokens
                    b.gpu_util = u
                    b.inflight_at_scrape = b.inflight
            if now < last_arrival or meta:
                seq += 1
                heapq.heappush(heap, (now + scrape_interval, seq, 2, 0))
    q = sum(s.prefix_queries for s in sims)
    return {"n": len(reqs), "errors": 0, "offered_rps": rate,
            "ttft_p50_ms": 1e3 * pct(ttft, 0.5), "ttft_p99_ms": 1e3 * pct(ttft, 0.99),
            "ttft_mean_ms": 1e3 * statistics.fmean(ttft),
            "e2e_p50_ms": 1e3 * pct(e2e, 0.5), "e2e_p99_ms": 1e3 * pct(e2e, 0.99),
            "hit_rate": sum(s.prefix_hits for s in sims) / q if q else 0.0,
            "per_backend": counts}


# ---------------------------------------------------------------------- study
PREFIX_GROUPS, PREFIX_TOKENS, PREFIX_CACHED = 16, 1024, 6  # system prompts, their length, how many a cache holds


def sim_config(args, prefix: bool = False) -> SimConfig:
    return SimConfig(max_num_seqs=8, token_time=args.token_ms / 1e3, batch_slowdown=0.15,
                     prefill_time_per_token=2e-5 * args.token_ms, chunk_tokens=50, util_window=0.25,
                     prefix_cache_blocks=PREFIX_CACHED * PREFIX_TOKENS // 16 if prefix else 0)


def long_tail_capacity(cfg: SimConfig, n: int) -> float:
    return capacity_rps(cfg, (500 - 50) / math.log(10), 175, n)


def fmt(res: dict) -> str:
    extra = f" | hit {res['hit_rate']:5.1%}" if "hit_rate" in res and res.get("hit_rate") else ""
    return (f"TTFT p50 {res['ttft_p50_ms']:7.1f} p99 {res['ttft_p99_ms']:7.1f} ms | E2E p50 {res['e2e_p50_ms']:6.0f} "
            f"p99 {res['e2e_p99_ms']:6.0f} ms | errors {res['errors']} | split {res['per_backend']}{extra}")


def virtual_long_tail(args) -> dict:
    cfg = sim_config(args)
    cap = long_tail_capacity(cfg, args.backends)
    rows = []
    for li, frac in enumerate(args.virtual_loads):
        rate = frac * cap
        reqs = long_tail(random.Random(7 + li), int(rate * args.virtual_duration))
        for policy in args.policies + ["oracle"]:
            res = run_virtual(policy, cfg, reqs, rate, seed=11 + li, n_backends=args.backends)
            res.update(policy=policy, load=frac)
            rows.append(res)
            print(f"  {policy:18s} load {frac:4.0%} ({rate:5.1f} req/s, n={len(reqs)}): {fmt(res)}", flush=True)
    return {"sim": cfg.__dict__, "capacity_rps": cap, "virtual_seconds": args.virtual_duration, "rows": rows}


def virtual_multi_router(args) -> dict:
    """Several independent routers (each sees only its own in-flight requests) in front of
    the same backends: does a policy that scrapes the backends' own counts do better?"""
    cfg = sim_config(args)
    cap = long_tail_capacity(cfg, args.backends)
    rows = []
    for routers in (2, 4):
        for li, frac in ((2, 0.8), (3, 0.9)):
            rate = frac * cap
            reqs = long_tail(random.Random(7 + li), int(rate * args.virtual_duration))
            for policy in ("round_robin", "least_outstanding", "engine_load"):
                res = run_virtual(policy, cfg, reqs, rate, seed=11 + li, n_backends=args.backends, routers=routers)
                res.update(policy=f"{policy} x{routers} routers", load=frac)
                rows.append(res)
                print(f"  {res['policy']:30s} load {frac:4.0%}: {fmt(res)}", flush=True)
    return {"rows": rows}


def virtual_prefix(args) -> dict:
    cfg = sim_config(args, prefix=True)
    rows = []
    for rate in args.prefix_rates:
        reqs = shared_prefix(random.Random(5), int(rate * args.virtual_duration), PREFIX_GROUPS, PREFIX_TOKENS)
        for policy in args.prefix_policies:
            res = run_virtual(policy, cfg, reqs, rate, seed=3, n_backends=args.backends)
            res.update(policy=policy, rate=rate)
            rows.append(res)
            print(f"  {policy:32s} {rate:5.1f} req/s n={len(reqs)}: {fmt(res)}", flush=True)
    return {"sim": cfg.__dict__, "rows": rows}


def http_long_tail(args) -> dict:
    cfg = sim_config(args)
    cap = long_tail_capacity(cfg, args.backends)
    sims = Sims(args.backends, cfg.__dict__)
    rows = []
    try:
        for policy in args.policies:
            name, _, kw = policy.partition(":")
            if kw or name == "oracle":
                continue  # tuning variants and the oracle run in virtual time only
            router = RouterProc(sims.urls, name)
            try:
                for li, frac in enumerate(args.http_loads):
                    rate = frac * cap
                    reqs = long_tail(random.Random(7 + li), max(50, int(rate * args.http_duration)))
                    before = [s["requests"] for s in sim_stats(sims.urls)]
                    cpu0 = (cpu_seconds(router.proc.pid), cpu_seconds(sims.proc.pid), time.process_time())
                    load0 = os.getloadavg()[0]
                    res = asyncio.run(drive(router.url, reqs, rate, seed=11 + li))
                    cpu1 = (cpu_seconds(router.proc.pid), cpu_seconds(sims.proc.pid), time.process_time())
                    after = [s["requests"] for s in sim_stats(sims.urls)]
                    res.update(policy=policy, load=frac, per_backend=[a - b for a, b in zip(after, before)],
                               loadavg=round((load0 + os.getloadavg()[0]) / 2, 1),
                               cpu_ms_per_req={k: round(1e3 * (b - a) / len(reqs), 2)
                                               for k, a, b in zip(("router", "sims", "client"), cpu0, cpu1)})
                    rows.append(res)
                    print(f"  {policy:18s} load {frac:4.0%} ({rate:5.1f} req/s, n={len(reqs)}): {fmt(res)} | "
                          f"loadavg {res['loadavg']} | CPU ms/req {res['cpu_ms_per_req']}", flush=True)
                    wait_idle(sims.urls)
            finally:
                router.close()
    finally:
        sims.close()
    return {"sim": cfg.__dict__, "capacity_rps": cap, "rows": rows}


def http_prefix(args) -> dict:
    cfg = sim_config(args, prefix=True)
    sims = Sims(args.backends, cfg.__dict__)
    rows = []
    rate = args.prefix_rates[0]
    try:
        for policy in args.prefix_policies:
            name, _, kw = policy.partition(":")
            if kw:
                continue
            reset_sims(sims.urls)
            router = RouterProc(sims.urls, name)
            try:
                reqs = shared_prefix(random.Random(5), max(50, int(rate * args.http_duration)), PREFIX_GROUPS, PREFIX_TOKENS)
                res = asyncio.run(drive(router.url, reqs, rate, seed=3))
                st = sim_stats(sims.urls)
                q = sum(s["prefix_queries"] for s in st)
                res.update(policy=policy, rate=rate, hit_rate=sum(s["prefix_hits"] for s in st) / q if q else 0.0,
                           per_backend=[s["requests"] for s in st])
                rows.append(res)
                print(f"  {policy:18s} {rate:5.1f} req/s n={len(reqs)}: {fmt(res)}", flush=True)
                wait_idle(sims.urls)
            finally:
                router.close()
    finally:
        sims.close()
    return {"sim": cfg.__dict__, "rows": rows}


def table(rows: list[dict], key: str, key_fmt) -> None:
    hdr = f"| {'policy':32s} | {key:6s} | TTFT p50 | TTFT p99 | E2E p50 | E2E p99 | hit rate | errors |"
    print(hdr)
    print("|" + "|".join("-" * len(c) for c in hdr.split("|")[1:-1]) + "|")
    for r in rows:
        hit = f"{r['hit_rate']:8.1%}" if r.get("hit_rate") else f"{'-':>8s}"
        print(f"| {r['policy']:32s} | {key_fmt(r):6s} | {r['ttft_p50_ms']:8.1f} | {r['ttft_p99_ms']:8.1f} | "
              f"{r['e2e_p50_ms']:7.0f} | {r['e2e_p99_ms']:7.0f} | {hit} | {r['errors']:6d} |")


def compare(rows: list[dict]) -> list[str]:
    by = {(r["policy"], r["load"]): r for r in rows}
    loads = sorted({r["load"] for r in rows})
    lines = []
    for other in ("round_robin", "gpu_util"):
        cells = []
        for ld in loads:
            if (other, ld) in by and (DEFAULT_POLICY, ld) in by:
                d, o = by[(DEFAULT_POLICY, ld)]["ttft_p99_ms"], by[(other, ld)]["ttft_p99_ms"]
                cells.append(f"{ld:.0%}: {d:.0f} vs {o:.0f} ms ({100 * (d / o - 1):+.0f}%)")
        if cells:
            lines.append(f"  P99 TTFT {DEFAULT_POLICY} vs {other}: " + "; ".join(cells))
    return lines


def print_tables(out: dict) -> None:
    load = lambda r: f"{r['load']:.0%}"  # noqa: E731
    rate = lambda r: f"{r['rate']:.0f}/s"  # noqa: E731
    if "virtual_long_tail" in out:
        v = out["virtual_long_tail"]
        print(f"\n## Long-tail workload, virtual time ({v['virtual_seconds']:.0f} s of arrivals per cell; 4 backends, "
              f"capacity ~{v['capacity_rps']:.0f} req/s; ms at 1 ms per simulated token)")
        table(v["rows"], "load", load)
        print("\n".join(compare(v["rows"])))
        print("  (oracle: sees every sequence's remaining tokens; a bound, not a policy)")
    if "virtual_multi_router" in out:
        print("\n## Several independent routers, same workload and backends, virtual time")
        table(out["virtual_multi_router"]["rows"], "load", load)
    if "virtual_prefix" in out:
        print(f"\n## Shared-prefix workload, virtual time ({PREFIX_GROUPS} system prompts of {PREFIX_TOKENS} tokens; "
              f"each backend's prefix cache holds {PREFIX_CACHED})")
        table(out["virtual_prefix"]["rows"], "rate", rate)
    if "http_long_tail" in out:
        h = out["http_long_tail"]
        print(f"\n## Long-tail workload through the real router over HTTP (wall clock; shared {os.cpu_count()}-core "
              f"machine, load average ~{statistics.fmean(r['loadavg'] for r in h['rows']):.1f})")
        table(h["rows"], "load", load)
        print("\n".join(compare(h["rows"])))
    if "http_prefix" in out:
        print("\n## Shared-prefix workload through the real router over HTTP")
        table(out["http_prefix"]["rows"], "rate", rate)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policies", nargs="+", default=POLICIES,
                   help="policies (virtual-time runs also take tuning variants like prefix_affinity:load_factor=2)")
    p.add_argument("--virtual-loads", nargs="+", type=float, default=[0.5, 0.7, 0.8, 0.9, 0.95],
                   help="fractions of capacity (virtual time)")
    p.add_argument("--virtual-duration", type=float, default=120.0, help="virtual seconds of arrivals per cell")
    p.add_argument("--http-loads", nargs="+", type=float, default=[0.8, 0.95], help="fractions of capacity (HTTP)")
    p.add_argument("--http-duration", type=float, default=10.0, help="wall seconds of arrivals per cell (HTTP)")
    p.add_argument("--backends", type=int, default=4)
    p.add_argument("--token-ms", type=float, default=1.0, help="simulated decode step of one sequence (ms)")
    p.add_argument("--prefix-policies", nargs="+",
                   default=["round_robin", "least_outstanding", "prefix_affinity", "prefix_affinity:slack=2"])
    p.add_argument("--prefix-rates", nargs="+", type=float, default=[40.0, 80.0])
    p.add_argument("--mode", choices=["all", "virtual", "http"], default="all")
    p.add_argument("--quick", action="store_true", help="smoke run (~1 min)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "router_policies.json"))
    args = p.parse_args()
    if args.quick:
        args.virtual_duration, args.virtual_loads = 30.0, [0.8, 0.95]
        args.http_duration, args.http_loads = 4.0, [0.8]
    t0 = time.time()
    out = {"default_policy": DEFAULT_POLICY, "cpu_count": os.cpu_count()}
    if args.mode in ("all", "virtual"):
        print("long-tail workload, virtual time")
        out["virtual_long_tail"] = virtual_long_tail(args)
        print("several routers, virtual time")
        out["virtual_multi_router"] = virtual_multi_router(args)
        print("shared-prefix workload, virtual time")
        out["virtual_prefix"] = virtual_prefix(args)
    if args.mode in ("all", "http"):
        print("long-tail workload, HTTP through the router")
        out["http_long_tail"] = http_long_tail(args)
        print("shared-prefix workload, HTTP through the router")
        out["http_prefix"] = http_prefix(args)
    out["wall_s"] = time.time() - t0
    print_tables(out)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"\nwrote {args.out} ({out['wall_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
