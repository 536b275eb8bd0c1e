"""What one streamed chunk costs the load generator's CPU: the measurements behind its hot path.

    python benchmarks/bench_client_hotpath.py                 # both parts, ~30 s on 2 cores
    python benchmarks/bench_client_hotpath.py --streams 128 --requests 512

Part 1 (parse): ns per SSE event to find what the metrics need (text or not, finish
reason, usage), for a compact (vLLM/pagedserve) and a spaced (json.dumps) chunk:
json.loads of every event (the old path), orjson.loads when installed, and the byte
probes of pagedserve/bench/client.py (json.loads only for the usage/error event).

Part 2 (end to end): client CPU seconds per chunk against the mock server
(tests/doubles/mock_openai_server.py in its own process), one event loop, `--streams`
concurrent streams: httpx + json.loads per chunk (the old client, reproduced here)
vs the current client (httptools pool + byte probes), on asyncio's loop and on uvloop
(what the --workers processes use). CPU is the client process's
own (time.process_time), so a shared, busy machine inflates wall time, not this.

Prints a table and writes benchmarks/results/bench_client_hotpath.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pagedserve.bench.client import _FULL, _TEXT, BenchRequest, RequestRecord, StreamPool, build_body, send_request  # noqa: E402,E501

COMPACT = (b'{"id":"cmpl-8f2a","object":"text_completion","created":1764400000,"model":"Qwen2.5-7B",'
           b'"choices":[{"index":0,"text":" the","logprobs":null,"finish_reason":null}],"usage":null}')
SPACED = json.dumps({"id": "cmpl-8f2a", "object": "text_completion", "created": 1764400000, "model": "Qwen2.5-7B",
                     "choices": [{"index": 0, "text": " the", "logprobs": None, "finish_reason": None}]}).encode()


def parse_old(payload: bytes) -> tuple:
    obj = json.loads(payload)
    usage = obj.get("usage")
    c0 = obj["choices"][0]
    return bool(c0.get("text")), c0.get("finish_reason"), usage


def parse_orjson(payload: bytes, loads) -> tuple:
    obj = loads(payload)
    c0 = obj["choices"][0]
    return bool(c0.get("text")), c0.get("finish_reason"), obj.get("usage")


def parse_new(payload: bytes) -> tuple:
    """The client's per-event work: two probes (the finish reason is read once per stream, not here)."""
    usage = json.loads(payload).get("usage") if _FULL.search(payload) else None
    return bool(_TEXT[False].search(payload)), None, usage


def time_per_call(fn, payload: bytes, n: int = 200_000) -> float:
    t = time.perf_counter_ns()
    for _ in range(n):
        fn(payload)
    return (time.perf_counter_ns() - t) / n


def part_parse() -> list[dict]:
    rows = []
    try:
        import orjson
    except ImportError:
        orjson = None
    for name, payload in (("compact", COMPACT), ("spaced", SPACED)):
        assert parse_new(payload)[:2] == (True, None) and parse_old(payload)[:2] == (True, None)
        row = {"chunk": name, "json_loads_ns": time_per_call(parse_old, payload),
               "probes_ns": time_per_call(parse_new, payload)}
        if orjson is not None:
            row["orjson_ns"] = time_per_call(lambda p: parse_orjson(p, orjson.loads), payload)
        rows.append(row)
    return rows


async def old_send(client, url: str, body: dict) -> int:
    """The previous client's loop: httpx stream, json.loads of every event."""
    chunks = 0
    async with client.stream("POST", url, json=body) as resp:
        buf = b""
        async for data in resp.aiter_bytes():
            buf += data
            if b"\n" not in data:
                continue
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if not line.startswith(b"data:") or line[5:].strip() in (b"[DONE]", b""):
                    continue
                obj = json.loads(line[5:].strip())
                c = obj.get("choices")
                if c and c[0].get("text"):
                    time.perf_counter()
                    chunks += 1
    return chunks


async def run_clients(url: str, kind: str, streams: int, requests: int, out_len: int) -> dict:
    import httpx

    body = build_body(BenchRequest("hello there", 2, out_len), "mock", "completions", True, 0.0)
    todo = list(range(requests))
    chunks = 0
    if kind == "httpx":
        clients = [httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=16),
                                     timeout=60, trust_env=False) for _ in range(-(-streams // 16))]
    else:
        pool = StreamPool(streams, 60.0)

    async def stream(i: int) -> None:
        nonlocal chunks
        while todo:
            todo.pop()
            if kind == "httpx":
                n = await old_send(clients[i % len(clients)], url, body)
                chunks += n
            else:
                rec = await send_request(pool, url, body, RequestRecord(0), time.perf_counter(), 60.0)
                assert rec.success, rec.error
                chunks += rec.chunks

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(stream(i) for i in range(streams)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if kind == "httpx":  # noqa: SIM108
        await asyncio.gather(*(c.aclose() for c in clients))
    else:
        await pool.aclose()
    return {"client": kind, "streams": streams, "requests": requests, "chunks": chunks, "cpu_s": cpu, "wall_s": wall,
            "cpu_us_per_chunk": cpu / chunks * 1e6, "cpu_us_per_request": cpu / requests * 1e6}


def part_e2e(args) -> list[dict]:
    mock = subprocess.Popen([sys.executable, str(ROOT / "tests/doubles/mock_openai_server.py"), "--port", "0",
                             "--ttft", "0.05", "--itl", str(args.itl)], stdout=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{int(mock.stdout.readline().split()[1])}/v1/completions"
        rows = []
        import uvloop

        for _ in range(2):  # interleaved: a noisy neighbour hits every variant
            for kind, run in (("httpx", asyncio.run), ("lean", asyncio.run), ("lean+uvloop", uvloop.run)):
                rows.append(run(run_clients(url, kind, args.streams, args.requests, args.output_len)))
        return rows
    finally:
        mock.terminate()
        mock.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=128)
    ap.add_argument("--requests", type=int, default=384)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--itl", type=float, default=0.02)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/bench_client_hotpath.json"))
    args = ap.parse_args()
    parse = part_parse()
    print("per SSE event (ns): json.loads of every event vs byte probes" + (" vs orjson" if "orjson_ns" in parse[0] else ""))
    for r in parse:
        print(f"  {r['chunk']:8s} json.loads {r['json_loads_ns']:7.0f}   probes {r['probes_ns']:7.0f}"
              + (f"   orjson {r['orjson_ns']:7.0f}" if "orjson_ns" in r else ""))
    e2e = part_e2e(args)
    print(f"\nclient CPU per chunk, {args.streams} streams, {args.requests} requests x {args.output_len} tokens (mock server)")
    print(f"  {'client':12s} {'µs/chunk':>9s} {'µs/request':>11s} {'CPU s':>7s} {'wall s':>7s}")
    for r in e2e:
        print(f"  {r['client']:12s} {r['cpu_us_per_chunk']:9.1f} {r['cpu_us_per_request']:11.0f} "
              f"{r['cpu_s']:7.2f} {r['wall_s']:7.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"parse": parse, "end_to_end": e2e, "args": vars(args)}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
