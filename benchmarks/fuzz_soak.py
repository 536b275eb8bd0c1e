"""Fuzz soak: thousands of hostile requests mixed with valid load against a real server.

Starts `pagedserve serve` (the default model on CPU, small limits) on 127.0.0.1, or
`serve --replicas 2` behind the router with --replicas 2, then sends --cases fuzzed requests
from tests/fuzz_cases.py (OpenAI-schema mutations, 90%, and raw-HTTP abuse, 10%) from
--workers threads while one more thread sends a valid greedy request in a loop and checks
its answer against the reference. Meanwhile /health is polled (its slowest answer is
reported) and the server's process tree RSS is sampled.

With --structured the cases are structured-output and tool requests (tests/fuzz_structured.py:
hostile schemas, tools, history tool calls, slow grammars), and --flood N then sends N concurrent
unique expensive schemas while a plain request is timed in a loop; the report adds the flood's
5xx count, the plain request's idle and worst latency during it, and the engine's RSS before
and after.

A defect is: any 5xx, an error that is not OpenAI-shaped JSON, a request without an
answer, a valid fuzz case not answered 200, /health not 200. Targets: 0 defects, 100% of
the valid load answered correctly. Prints a table and writes JSON (--out). Loopback only.

    python benchmarks/fuzz_soak.py --cases 5000
    python benchmarks/fuzz_soak.py --structured --cases 2000 --flood 100
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pagedserve.server.launch import ServerProcess  # noqa: E402
from tests.fuzz_cases import api_case, check_response, raw_case, send_raw  # noqa: E402
from tests.fuzz_structured import expensive_schema, structured_case  # noqa: E402

REF = {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}
SERVE_ARGS = ["--max-model-len", "512", "--kv-cache-memory", "0.25", "--max-num-seqs", "8"]


def tree_rss_mib(pid: int) -> float:
    """RSS of a process and all its descendants (server + engine, or launcher + replicas + engines)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(x.split()[1]) for x in f if x.startswith("VmRSS:")) / 1024
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration, ValueError):
            pass
    return total


def engine_rss_mib(server_pid: int) -> float:
    """RSS of the server's direct children alone (the engine process; not its compile workers)."""
    total = 0.0
    try:
        with open(f"/proc/{server_pid}/task/{server_pid}/children") as f:
            kids = [int(c) for c in f.read().split()]
        for k in kids:
            with open(f"/proc/{k}/status") as f:
                total += next(int(x.split()[1]) for x in f if x.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration, ValueError):
        pass
    return total


class Soak:
    def __init__(self, url: str, port: int, model: str, ref_text: str, cases: int, workers: int, seed: int,
                 max_seconds: float | None = None, structured: bool = False):
        self.structured = structured
        self.url, self.port, self.model, self.ref_text = url, port, model, ref_text
        self.cases, self.workers, self.seed = cases, workers, seed
        self.lock = threading.Lock()
        self.next_case = 0
        self.statuses: collections.Counter = collections.Counter()
        self.kinds: collections.Counter = collections.Counter()
        self.defects: list[str] = []
        self.valid_sent = self.valid_ok = self.valid_same_text = 0
        self.health_statuses: collections.Counter = collections.Counter()
        self.health_slowest = 0.0
        self.rss: list[tuple[float, float]] = []
        self.done = threading.Event()
        self.deadline = time.monotonic() + max_seconds if max_seconds else None

    def _take(self) -> int | None:
        with self.lock:
            if self.next_case >= self.cases or (self.deadline and time.monotonic() > self.deadline):
                return None
            self.next_case += 1
            return self.next_case - 1

    def fuzz_worker(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120, trust_env=False) as c:
            while (i := self._take()) is not None:
                rng = random.Random(self.seed * 1_000_003 + i)
                if not self.structured and rng.random() < 0.1:
                    name, data = raw_case(rng, f"127.0.0.1:{self.port}")
                    status, _, body = send_raw("127.0.0.1", self.port, data)
                    problem = check_response(status, "", body, allow_no_answer=name == "garbage")
                    kind, desc = "raw", name
                else:
                    case = (structured_case if self.structured else api_case)(rng, self.model)
                    try:
                        r = c.post(case.path, content=case.body, headers={"content-type": "application/json"})
                        status, body = r.status_code, r.content
                        problem = check_response(status, "", body)
                        if problem is None and case.valid and status != 200:
                            problem = f"valid request answered {status}"
                    except httpx.HTTPError as e:
                        status, problem = None, f"no answer: {e!r}"
                    kind, desc = ("api_valid" if case.valid else "api_mutated"), case.body[:200]
                with self.lock:
                    self.statuses[status or 0] += 1
                    self.kinds[kind] += 1
                    if problem:
                        self.defects.append(f"case {i} {kind} {desc!r}: {problem}")

    def valid_worker(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120, trust_env=False) as c:
            while not self.done.is_set():
                self.valid_sent += 1
                try:
                    r = c.post("/v1/completions", json={**REF, "model": self.model})
                    data = r.json() if r.status_code == 200 else {}
                    choice = (data.get("choices") or [{}])[0]
                    if (isinstance(choice.get("text"), str) and choice.get("finish_reason") in ("length", "stop")
                            and data["usage"]["completion_tokens"] <= REF["max_tokens"]):
                        self.valid_ok += 1
                        # Greedy text may differ from the lone reference when batched with other requests
                        # (CPU GEMM results depend on the batch shape): counted, not a defect.
                        self.valid_same_text += choice["text"] == self.ref_text
                    else:
                        self.defects.append(f"valid load: {r.status_code} {r.text[:200]}")
                except httpx.HTTPError as e:
                    self.defects.append(f"valid load: no answer {e!r}")

    def monitor(self, pid: int, t0: float) -> None:
        with httpx.Client(timeout=30, trust_env=False) as c:
            last_rss = 0.0
            while not self.done.is_set():
                t = time.perf_counter()
                try:
                    s = c.get(self.url + "/health").status_code
                except httpx.HTTPError:
                    s = 0
                self.health_slowest = max(self.health_slowest, time.perf_counter() - t)
                self.health_statuses[s] += 1
                if s != 200:
                    self.defects.append(f"/health answered {s}")
                if time.monotonic() - last_rss >= 5:
                    last_rss = time.monotonic()
                    self.rss.append((round(time.monotonic() - t0, 1), round(tree_rss_mib(pid), 1)))
                self.done.wait(0.2)

    def run(self, pid: int) -> float:
        t0 = time.monotonic()
        threads = [threading.Thread(target=self.monitor, args=(pid, t0), daemon=True),
                   threading.Thread(target=self.valid_worker, daemon=True)]
        fuzzers = [threading.Thread(target=self.fuzz_worker, daemon=True) for _ in range(self.workers)]
        for t in threads + fuzzers:
            t.start()
        last = -1
        while any(t.is_alive() for t in fuzzers):
            time.sleep(1)
            if self.next_case // 250 != last:
                last = self.next_case // 250
                print(f"  {self.next_case}/{self.cases} cases, {len(self.defects)} defects, "
                      f"{time.monotonic() - t0:.0f}s", flush=True)
        self.done.set()
        for t in threads:
            t.join()
        self.rss.append((round(time.monotonic() - t0, 1), round(tree_rss_mib(pid), 1)))
        return time.monotonic() - t0


def flood(url: str, model: str, n: int, server_pid: int, seed: int) -> dict:
    """`n` concurrent unique expensive schemas; meanwhile a plain request in a loop, timed."""
    def plain(c: httpx.Client) -> float:
        t = time.perf_counter()
        r = c.post("/v1/completions", json={**REF, "model": model})
        assert r.status_code == 200, r.text
        return time.perf_counter() - t

    statuses: collections.Counter = collections.Counter()
    done = threading.Event()
    during: list[float] = []
    with httpx.Client(base_url=url, timeout=300, trust_env=False) as c:
        idle = min(plain(c) for _ in range(5))
        before = (engine_rss_mib(server_pid), tree_rss_mib(server_pid))

        def one(i: int) -> None:
            body = {"model": model, "messages": [{"role": "user", "content": "Pick one."}], "max_tokens": 2,
                    "response_format": {"type": "json_schema",
                                        "json_schema": {"name": "e", "schema": expensive_schema(seed * 100_000 + i)}}}
            try:
                with httpx.Client(base_url=url, timeout=300, trust_env=False) as own:
                    statuses[own.post("/v1/chat/completions", json=body).status_code] += 1
            except httpx.HTTPError:
                statuses[0] += 1

        def probe() -> None:
            with httpx.Client(base_url=url, timeout=300, trust_env=False) as pc:
                while not done.is_set():
                    during.append(plain(pc))

        t0 = time.monotonic()
        senders = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        prober = threading.Thread(target=probe)
        prober.start()
        for t in senders:
            t.start()
        for t in senders:
            t.join()
        done.set()
        prober.join()
        seconds = time.monotonic() - t0
        time.sleep(2)
        after = (engine_rss_mib(server_pid), tree_rss_mib(server_pid))
    return {"requests": n, "seconds": round(seconds, 1), "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "5xx": sum(v for k, v in statuses.items() if k >= 500 or k == 0),
            "plain_idle_s": round(idle, 3), "plain_worst_during_s": round(max(during, default=0.0), 3),
            "plain_worst_over_idle": round(max(during, default=0.0) / idle, 2), "plain_samples": len(during),
            "engine_rss_mib": {"before": round(before[0], 1), "after": round(after[0], 1)},
            "tree_rss_mib": {"before": round(before[1], 1), "after": round(after[1], 1)}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=5000)
    p.add_argument("--workers", type=int, default=4, help="fuzzing threads (one more sends the valid load)")
    p.add_argument("--replicas", type=int, default=1, help="2: fuzz the router of `serve --replicas 2`")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve-args", default="", help="extra `serve` flags, e.g. --async-scheduling")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop starting new cases after this long (a busy machine); the report says how many ran")
    p.add_argument("--structured", action="store_true",
                   help="structured-output and tool cases (tests/fuzz_structured.py) instead of the general mix")
    p.add_argument("--flood", type=int, default=0,
                   help="after the cases: this many concurrent unique expensive schemas, timing a plain request")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/fuzz_soak[_structured]"
                                               "[_replicas2].json)")
    args = p.parse_args()
    name = "fuzz_soak" + ("_structured" if args.structured else "")
    out = Path(args.out or ROOT / "benchmarks" / "results" /
               (f"{name}.json" if args.replicas == 1 else f"{name}_replicas{args.replicas}.json"))
    extra = (["--replicas", str(args.replicas)] if args.replicas > 1 else []) + shlex.split(args.serve_args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server on the way out
    srv = ServerProcess(SERVE_ARGS + extra)
    srv.start()
    try:
        srv.wait_ready(600)
        if args.replicas > 1:  # wait for every replica, not just the first
            deadline = time.time() + 600
            while httpx.get(srv.url + "/health", trust_env=False).json().get("healthy_backends") != args.replicas:
                assert time.time() < deadline, "replicas not ready"
                time.sleep(0.5)
        model = httpx.get(srv.url + "/v1/models", trust_env=False).json()["data"][0]["id"]
        ref = httpx.post(srv.url + "/v1/completions", json={**REF, "model": model}, timeout=120,
                         trust_env=False).json()["choices"][0]["text"]
        print(f"fuzz soak: {args.cases} cases, {args.workers} workers, target "
              f"{'serve' if args.replicas == 1 else f'router + {args.replicas} replicas'} at {srv.url}")
        soak = Soak(srv.url, srv.port, model, ref, args.cases, args.workers, args.seed, args.max_seconds,
                    args.structured)
        seconds = soak.run(srv.proc.pid)
        flooded = flood(srv.url, model, args.flood, srv.proc.pid, args.seed) if args.flood else None
    finally:
        srv.terminate()
    rss = [r for _, r in soak.rss]
    result = {
        "target": ("serve" if args.replicas == 1 else f"serve --replicas {args.replicas} (router)")
                  + (f" {args.serve_args}" if args.serve_args else ""),
        "cases": sum(soak.kinds.values()), "kinds": dict(soak.kinds),
        "status_histogram": {str(k): v for k, v in sorted(soak.statuses.items())},
        "defects": len(soak.defects), "defect_examples": soak.defects[:20],
        "valid_load": {"sent": soak.valid_sent, "ok": soak.valid_ok, "same_text_as_alone": soak.valid_same_text,
                       "success_rate": round(soak.valid_ok / max(soak.valid_sent, 1), 4)},
        "health": {"polls": sum(soak.health_statuses.values()),
                   "statuses": {str(k): v for k, v in soak.health_statuses.items()},
                   "slowest_s": round(soak.health_slowest, 3)},
        "rss_mib": {"start": rss[0], "max": max(rss), "end": rss[-1], "samples": soak.rss},
        "cases_requested": args.cases, "seconds": round(seconds, 1), "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg()[0],
        "flood": flooded,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    hist = ", ".join(f"{k}: {v}" for k, v in result["status_histogram"].items())
    rows = [("target", result["target"]),
            ("cases (api valid / api mutated / raw)", f"{result['cases']} ({soak.kinds['api_valid']} / "
             f"{soak.kinds['api_mutated']} / {soak.kinds['raw']})"),
            ("status histogram (0 = no answer)", hist),
            ("defects", str(result["defects"])),
            ("valid load answered correctly", f"{soak.valid_ok}/{soak.valid_sent} "
             f"({100 * result['valid_load']['success_rate']:.1f}%; same text as alone: {soak.valid_same_text})"),
            ("/health polls, all 200; slowest", f"{result['health']['polls']}, "
             f"{set(soak.health_statuses) == {200}}; {result['health']['slowest_s'] * 1000:.0f} ms"),
            ("RSS MiB start / max / end", f"{rss[0]:.0f} / {max(rss):.0f} / {rss[-1]:.0f}"),
            ("duration", f"{seconds:.0f} s")]
    if flooded:
        e, t = flooded["engine_rss_mib"], flooded["tree_rss_mib"]
        rows += [(f"flood: {flooded['requests']} unique schemas, statuses", str(flooded["statuses"])),
                 ("flood: 5xx", str(flooded["5xx"])),
                 ("flood: plain request idle / worst during", f"{flooded['plain_idle_s'] * 1000:.0f} ms / "
                  f"{flooded['plain_worst_during_s'] * 1000:.0f} ms ({flooded['plain_worst_over_idle']}x)"),
                 ("flood: engine RSS MiB before / after", f"{e['before']:.0f} / {e['after']:.0f} (tree "
                  f"{t['before']:.0f} / {t['after']:.0f})")]
    w = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"| {k:<{w}} | {v} |")
    for d in soak.defects[:10]:
        print("DEFECT:", d)
    print(f"\nwrote {out}")
    flood_ok = not flooded or flooded["5xx"] == 0
    return 0 if not soak.defects and soak.valid_ok == soak.valid_sent and flood_ok else 1


if __name__ == "__main__":
    sys.exit(main())
