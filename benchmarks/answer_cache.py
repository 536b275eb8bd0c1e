"""Answer cache: latency of a hit vs a miss through `pagedserve router` on the bench mock server.

The mock server (tests/doubles/mock_openai_server.py) stands in for a model: --ttft seconds to the
first token, then one token every --itl seconds. Three routers in their own processes:
no cache, and `--answer-cache memory`. Sequential requests (one at a time, keep-alive):

- no cache: the same temperature-0 request each time (every one goes upstream);
- miss: a new prompt each time (lookup + upstream + store);
- hit: the same request each time after one warm-up (answered by the router alone).

Non-streamed and streamed (time to the whole answer). Prints a table, writes JSON (--out).

    python benchmarks/answer_cache.py
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pagedserve.ports import free_port  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not come up")


def start(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def timed(client: httpx.Client, body: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    if body.get("stream"):
        with client.stream("POST", "/v1/completions", json=body) as r:
            for _ in r.iter_raw():
                pass
    else:
        r = client.post("/v1/completions", json=body)
    dt = time.perf_counter() - t0
    assert r.status_code == 200, r.status_code
    return dt, r.headers.get("x-answer-cache", "-")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=100, help="requests per cell")
    p.add_argument("--ttft", type=float, default=0.05)
    p.add_argument("--itl", type=float, default=0.005)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "answer_cache.json"))
    a = p.parse_args()

    procs = []
    try:
        mport = free_port()
        procs.append(start([sys.executable, str(ROOT / "tests/doubles/mock_openai_server.py"), "--port", str(mport),
                            "--ttft", str(a.ttft), "--itl", str(a.itl)]))
        wait_http(f"http://127.0.0.1:{mport}")
        urls = {}
        for name, extra in (("off", []), ("memory", ["--answer-cache", "memory"])):
            port = free_port()
            procs.append(start([sys.executable, "-m", "pagedserve.cli", "router", "--host", "127.0.0.1", "--port",
                                str(port), "--backend", f"http://127.0.0.1:{mport}", "--log-level", "warning",
                                *extra]))
            urls[name] = f"http://127.0.0.1:{port}"
        for u in urls.values():
            wait_http(u)
        rows = []
        for stream in (False, True):
            base = {"model": "mock", "max_tokens": a.max_tokens, "temperature": 0, "stream": stream}
            cells = {}
            with httpx.Client(base_url=urls["off"], timeout=30) as c:
                timed(c, {**base, "prompt": "warm"})
                cells["no cache"] = [timed(c, {**base, "prompt": "same"})[0] for _ in range(a.n)]
            with httpx.Client(base_url=urls["memory"], timeout=30) as c:
                miss = [timed(c, {**base, "prompt": f"new {stream} {i}"}) for i in range(a.n)]
                assert {s for _, s in miss} == {"miss"}
                cells["cache miss"] = [t for t, _ in miss]
                timed(c, {**base, "prompt": "same"})
                hit = [timed(c, {**base, "prompt": "same"}) for _ in range(a.n)]
                assert {s for _, s in hit} == {"hit"}
                cells["cache hit"] = [t for t, _ in hit]
            for name, xs in cells.items():
                rows.append({"stream": stream, "case": name, "p50_ms": 1e3 * pct(xs, 50), "p99_ms": 1e3 * pct(xs, 99),
                             "n": len(xs)})
    finally:
        for pr in procs:
            pr.terminate()
        for pr in procs:
            pr.wait(10)
    print(f"mock model: ttft {a.ttft * 1e3:.0f} ms, itl {a.itl * 1e3:.0f} ms, {a.max_tokens} tokens; "
          f"{a.n} sequential requests per cell")
    print(f"{'response':<10} {'case':<12} {'P50 ms':>8} {'P99 ms':>8}")
    for r in rows:
        print(f"{'stream' if r['stream'] else 'json':<10} {r['case']:<12} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f}")
    out = {"config": vars(a), "cpu_count": os.cpu_count(), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
