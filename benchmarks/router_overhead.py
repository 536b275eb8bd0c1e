"""Router overhead: the same requests sent straight to a fast backend and through the router.

- Latency: sequential requests (one at a time), direct and routed interleaved in blocks so
  machine noise hits both alike. Added P50/P99 for a non-streamed completion and for a
  streamed one (time to the first byte and to the end). Target: added P50 <= 2 ms.
- Throughput: a closed loop of keep-alive connections (a lean raw-socket client, so the client
  takes as little CPU as possible) for a few seconds: requests/s direct and routed, and the
  router's CPU time per request (1000 / that = req/s one core of router sustains).

The fast backend is a minimal ASGI app (instant answers) in its own process; the router is
`pagedserve router` in another; everything shares this machine's cores. Prints a table and
writes JSON (--out).

    python benchmarks/router_overhead.py
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from pagedserve.ports import free_port  # noqa: E402
from router_policies import RouterProc, cpu_seconds, pct  # noqa: E402

COMPLETION = json.dumps({"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "fast",
                         "choices": [{"index": 0, "text": " Paris.", "finish_reason": "stop", "logprobs": None}],
                         "usage": {"prompt_tokens": 6, "completion_tokens": 2, "total_tokens": 8}}).encode()
CHUNK = b'data: {"id":"cmpl-1","object":"text_completion","created":0,"model":"fast","choices":[{"index":0,"text":" x","finish_reason":null}]}\n\n'
REQUEST = {"model": "fast", "prompt": "The capital of France is", "max_tokens": 2}


async def fast_backend(scope, receive, send):
    """Instant OpenAI-ish answers: JSON, or 4 SSE events when stream is true."""
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    if scope["path"] in ("/health", "/metrics", "/v1/models"):
        out = b'{"object":"list","data":[{"id":"fast","object":"model"}]}' if scope["path"] == "/v1/models" else b"{}"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": out})
        return
    if b'"stream": true' in body or b'"stream":true' in body:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for _ in range(3):
            await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(COMPLETION)).encode())]})
    await send({"type": "http.response.body", "body": COMPLETION})


def serve_backend(port: int) -> None:
    import uvicorn

    from pagedserve.cluster.uvicorn_server import uvicorn_config

    uvicorn.Server(uvicorn_config(fast_backend, "127.0.0.1", port, lifespan="off")).run()


class Backend:
    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve-backend", str(self.port)], cwd=ROOT)
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                httpx.get(self.url + "/health", timeout=1, trust_env=False)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("backend did not start")

    def close(self):
        self.proc.terminate()
        self.proc.wait(10)


# ---------------------------------------------------------------------- latency
async def latency(direct: str, routed: str, n: int, block: int = 25) -> dict:
    res = {k: [] for k in ("direct_json", "routed_json", "direct_ttfb", "routed_ttfb", "direct_stream", "routed_stream")}
    block_diffs = {"json": [], "ttfb": [], "stream": []}  # per block: median routed - median direct
    stream_body = dict(REQUEST, stream=True)
    async with httpx.AsyncClient(timeout=10, trust_env=False) as c:
        for url in (direct, routed):  # warm up both connections
            for _ in range(20):
                await c.post(url + "/v1/completions", json=REQUEST)
        for _ in range(0, n, block):
            marks = {k: len(v) for k, v in res.items()}
            for name, url in (("direct", direct), ("routed", routed)):
                for _ in range(block):
                    t0 = time.perf_counter()
                    r = await c.post(url + "/v1/completions", json=REQUEST)
                    res[f"{name}_json"].append(time.perf_counter() - t0)
                    assert r.status_code == 200
                for _ in range(block // 2):
                    t0 = time.perf_counter()
                    first = None
                    async with c.stream("POST", url + "/v1/completions", json=stream_body) as r:
                        async for _chunk in r.aiter_raw():
                            if first is None:
                                first = time.perf_counter() - t0
                    res[f"{name}_ttfb"].append(first)
                    res[f"{name}_stream"].append(time.perf_counter() - t0)
            for kind in block_diffs:
                d, r = res[f"direct_{kind}"][marks[f"direct_{kind}"]:], res[f"routed_{kind}"][marks[f"routed_{kind}"]:]
                block_diffs[kind].append(pct(r, 0.5) - pct(d, 0.5))
    out = {}
    for kind in ("json", "ttfb", "stream"):
        d, r = res[f"direct_{kind}"], res[f"routed_{kind}"]
        out[kind] = {"direct_p50_ms": 1e3 * pct(d, 0.5), "routed_p50_ms": 1e3 * pct(r, 0.5),
                     "added_p50_ms": 1e3 * (pct(r, 0.5) - pct(d, 0.5)),
                     "direct_p99_ms": 1e3 * pct(d, 0.99), "routed_p99_ms": 1e3 * pct(r, 0.99),
                     "added_p99_ms": 1e3 * (pct(r, 0.99) - pct(d, 0.99)), "n": len(d),
                     # robust to load changing during the run: the median over blocks of paired medians
                     "added_p50_blockwise_ms": 1e3 * pct(block_diffs[kind], 0.5)}
    return out


# ---------------------------------------------------------------------- throughput
async def hammer(port: int, conc: int, duration: float, stream: bool = False) -> dict:
    """Closed loop over `conc` keep-alive connections with a minimal HTTP/1.1 client
    (httptools parses the answers, chunked or not)."""
    import httptools

    body = json.dumps(dict(REQUEST, stream=True) if stream else REQUEST).encode()
    req = (b"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
           b"content-length: %d\r\n\r\n" % len(body)) + body
    done = errors = 0
    lat: list[float] = []
    stop = time.perf_counter() + duration

    class Answer:
        def __init__(self):
            self.complete = False

        def on_message_complete(self):
            self.complete = True

    async def worker():
        nonlocal done, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                writer.write(req)
                answer = Answer()
                parser = httptools.HttpResponseParser(answer)
                while not answer.complete:
                    data = await reader.read(65536)
                    if not data:
                        raise ConnectionError("closed")
                    parser.feed_data(data)
                if parser.get_status_code() == 200:
                    done += 1
                    lat.append(time.perf_counter() - t0)
                else:
                    errors += 1
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    wall = time.perf_counter() - t0
    return {"concurrency": conc, "rps": done / wall, "errors": errors, "p50_ms": 1e3 * pct(lat, 0.5),
            "p99_ms": 1e3 * pct(lat, 0.99)}


def run_hammer(port: int, conc: int, duration: float, stream: bool = False) -> dict:
    from pagedserve.cluster.uvicorn_server import new_event_loop

    loop = new_event_loop()
    try:
        return loop.run_until_complete(hammer(port, conc, duration, stream))
    finally:
        loop.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve-backend", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=400, help="sequential requests per path for latency")
    p.add_argument("--concurrency", nargs="+", type=int, default=[8, 32, 128])
    p.add_argument("--duration", type=float, default=5.0, help="seconds per throughput run")
    p.add_argument("--policy", default=None, help="router policy (default: the router's default)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "router_overhead.json"))
    args = p.parse_args()
    if args.serve_backend:
        serve_backend(args.serve_backend)
        return 0
    backend = Backend()
    from pagedserve.cluster.policies import DEFAULT_POLICY

    policy = args.policy or DEFAULT_POLICY
    router = RouterProc([backend.url], policy)
    out = {"cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()[0], "policy": policy}
    try:
        from pagedserve.cluster.uvicorn_server import new_event_loop

        loop = new_event_loop()
        out["latency"] = loop.run_until_complete(latency(backend.url, router.url, args.n))
        loop.close()
        out["throughput"] = []
        for stream in (False, True):
            for conc in args.concurrency:
                d = run_hammer(backend.port, conc, args.duration, stream)
                c0 = cpu_seconds(router.proc.pid)
                r = run_hammer(router.port, conc, args.duration, stream)
                r_cpu = cpu_seconds(router.proc.pid) - c0
                row = {"stream": stream, "concurrency": conc, "direct_rps": d["rps"], "routed_rps": r["rps"],
                       "direct_p50_ms": d["p50_ms"], "routed_p50_ms": r["p50_ms"], "routed_p99_ms": r["p99_ms"],
                       "errors": d["errors"] + r["errors"],
                       "router_cpu_ms_per_req": 1e3 * r_cpu / max(1, r["rps"] * args.duration)}
                out["throughput"].append(row)
                print(f"  {'stream' if stream else 'json  '} concurrency {conc:4d}: direct {d['rps']:7.0f} req/s, "
                      f"routed {r['rps']:7.0f} req/s (p50 {r['p50_ms']:.1f} ms), router CPU "
                      f"{row['router_cpu_ms_per_req']:.3f} ms/req", flush=True)
    finally:
        router.close()
        backend.close()
    out["loadavg_end"] = os.getloadavg()[0]
    lat = out["latency"]
    print(f"\n## Router overhead (policy {out['policy']}; {os.cpu_count()} cores shared by backend, router and client; "
          f"load average {out['loadavg_start']:.1f} -> {out['loadavg_end']:.1f})")
    print("| request | direct P50 | routed P50 | added P50 | added P50 (paired blocks) | direct P99 | routed P99 | added P99 |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, label in (("json", "completion (JSON)"), ("ttfb", "stream, first byte"), ("stream", "stream, to [DONE]")):
        x = lat[kind]
        print(f"| {label} | {x['direct_p50_ms']:.2f} ms | {x['routed_p50_ms']:.2f} ms | {x['added_p50_ms']:+.2f} ms | "
              f"{x['added_p50_blockwise_ms']:+.2f} ms | "
              f"{x['direct_p99_ms']:.2f} ms | {x['routed_p99_ms']:.2f} ms | {x['added_p99_ms']:+.2f} ms |")
    print("\n| request | connections | direct req/s | routed req/s | routed P50 | routed P99 | router CPU/req | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for row in out["throughput"]:
        print(f"| {'stream (4 events)' if row['stream'] else 'JSON'} | {row['concurrency']} | {row['direct_rps']:.0f} | "
              f"{row['routed_rps']:.0f} | {row['routed_p50_ms']:.1f} ms | {row['routed_p99_ms']:.1f} ms | "
              f"{row['router_cpu_ms_per_req']:.3f} ms | {row['errors']} |")
    for stream in (False, True):
        best = max((r for r in out["throughput"] if r["stream"] == stream), key=lambda r: r["routed_rps"])
        out["max_routed_rps_stream" if stream else "max_routed_rps"] = best["routed_rps"]
        print(f"max through the router ({'streamed' if stream else 'JSON'}): {best['routed_rps']:.0f} req/s at "
              f"{best['concurrency']} connections; router CPU {best['router_cpu_ms_per_req']:.3f} ms/req "
              f"(~{1000 / best['router_cpu_ms_per_req']:.0f} req/s per core it gets)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
