"""HTTP serving overhead: streaming throughput through `pagedserve serve` vs the offline engine.

Same workload on both sides, measured in the same run: N requests of random token-id prompts
(--input-len tokens) generating exactly --output-len tokens (ignore_eos, greedy).

- offline: `LLM(max_num_seqs=C)` with all N requests submitted at once (the engine keeps C running).
- offline closed loop: the same engine, in this process, fed like the HTTP client feeds the server:
  C requests in flight, each finished one replaced at once. Comparing http with this isolates the
  cost of HTTP + the engine process from the cost of requests arriving one by one (which spreads
  prefills over more steps; on a fast GPU step that matters).
- http: one `pagedserve serve` process (engine in its own process); a closed-loop client keeps C
  streaming requests in flight (stream=true, usage from the final chunk). The client is a minimal
  asyncio HTTP/1.1 reader, so the measurement is the server's cost, not a heavy client's.

throughput = generated tokens / wall time; ratio = http / offline (target >= 0.9); ratio_cl = http /
offline closed loop.

    .venv/bin/python benchmarks/server_overhead.py                       # C = 32, 64
    .venv/bin/python benchmarks/server_overhead.py --concurrency 8 --num-prompts 16 --output-len 16
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cpu_seconds(pid: int | None = None) -> float:
    """user+system CPU seconds of a process (Linux /proc), this one by default."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]


# -- offline ------------------------------------------------------------------------------------

def run_offline(engine_kw: dict, prompts: list[list[int]], output_len: int, concurrency: int, llm=None) -> dict:
    from pagedserve import LLM, SamplingParams

    if llm is None:
        llm = LLM(**engine_kw, max_num_seqs=concurrency)
    llm.engine.scheduler.max_num_seqs = concurrency
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:concurrency]], params, use_tqdm=False)  # warm-up
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"wall_s": wall, "output_tokens": tokens, "tok_per_s": tokens / wall,
            "cpu_cores_busy": round((cpu_seconds() - cpu0) / wall, 3)}


_ids = iter(range(1 << 62))


def run_offline_closed_loop(llm, prompts: list[list[int]], output_len: int, concurrency: int) -> dict:
    from pagedserve import SamplingParams

    eng = llm.engine
    eng.scheduler.max_num_seqs = concurrency
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)

    def run(items):
        todo = iter(items)

        def add():
            p = next(todo, None)
            if p is not None:
                eng.add_request(f"cl-{next(_ids)}", None, params, prompt_token_ids=p)

        for _ in range(concurrency):
            add()
        tokens = 0
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    tokens += len(o.outputs[0].token_ids)
                    add()
        return tokens

    run(prompts[:concurrency])  # warm-up
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    tokens = run(prompts)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "output_tokens": tokens, "tok_per_s": tokens / wall,
            "cpu_cores_busy": round((cpu_seconds() - cpu0) / wall, 3)}


# -- http -----------------------------------------------------------------------------------------

class _Conn:
    """One keep-alive HTTP/1.1 connection that streams SSE completions."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def open(self):
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def stream(self, body: bytes) -> dict:
        w, r = self.writer, self.reader
        w.write(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        t0 = time.perf_counter()
        status = await r.readline()
        if not status.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"server answered {status!r}")
        while (await r.readline()) not in (b"\r\n", b""):
            pass
        buf = b""
        first = last = None
        gaps = []
        usage = None
        while True:
            size = int((await r.readline()).strip(), 16)
            if size == 0:
                await r.readline()
                break
            data = await r.readexactly(size + 2)
            now = time.perf_counter()
            buf += data[:-2]
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if not event.startswith(b"data: ") or event == b"data: [DONE]":
                    continue
                if b'"usage":{' in event:
                    usage = json.loads(event[6:])["usage"]
                if b'"text":"' in event and b'"text":""' not in event or b'"finish_reason":"' in event:
                    if first is None:
                        first = now
                    else:
                        gaps.append(now - last)
                    last = now
        return {"ttft": (first or time.perf_counter()) - t0, "gaps": gaps, "usage": usage,
                "e2e": time.perf_counter() - t0}

    def close(self):
        if self.writer is not None:
            self.writer.close()


async def _http_run(url: str, model: str, prompts: list[list[int]], output_len: int, concurrency: int,
                    pids: dict[str, int]) -> dict:
    host, port = url.split("//")[1].split(":")
    port = int(port)
    queue = list(range(len(prompts)))
    results = []

    def body(p):
        return json.dumps({"model": model, "prompt": p, "max_tokens": output_len, "temperature": 0,
                           "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}).encode()

    async def worker(items, collect):
        conn = _Conn(host, port)
        await conn.open()
        try:
            while items:
                i = items.pop()
                res = await conn.stream(body(prompts[i]))
                if collect is not None:
                    collect.append(res)
        finally:
            conn.close()

    warm = list(range(min(concurrency, len(prompts))))
    await asyncio.gather(*(worker(warm, None) for _ in range(concurrency)))
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()} | {"client": cpu_seconds()}
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(queue, results) for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    cpu = {k: round((cpu_seconds(pids.get(k)) - v) / wall, 3) for k, v in cpu0.items()}
    tokens = sum(r["usage"]["completion_tokens"] for r in results)
    gaps = [g for r in results for g in r["gaps"]]
    return {"wall_s": wall, "output_tokens": tokens, "tok_per_s": tokens / wall,
            "ttft_p50_s": statistics.median(r["ttft"] for r in results),
            "itl_p50_s": statistics.median(gaps) if gaps else None,
            "e2e_p50_s": statistics.median(r["e2e"] for r in results), "cpu_cores_busy": cpu}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--concurrency", default="32,64")
    ap.add_argument("--num-prompts", default=None, help="per concurrency (default: 4 x concurrency)")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--kv-cache-memory", type=float, default=None, help="GiB (CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.4,
                    help="per engine on CUDA: the offline engine and the server share the GPU (default 0.4)")
    ap.add_argument("--load-format", default="auto", help="dummy: random weights (same speed, no download)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="alternate offline/http runs; report the medians")
    ap.add_argument("--server-threads", type=int, default=None,
                    help="PAGEDSERVE_NUM_THREADS for the server's engine process (default: torch's)")
    ap.add_argument("--out", default="benchmarks/results/server_overhead.json")
    args = ap.parse_args()

    import torch

    from pagedserve.server.launch import ServerProcess

    concs = [int(c) for c in args.concurrency.split(",")]
    nums = [int(n) for n in args.num_prompts.split(",")] if args.num_prompts else [4 * c for c in concs]
    if len(nums) == 1:
        nums *= len(concs)
    engine_kw = {"model": args.model, "max_model_len": args.max_model_len, "device": args.device,
                 "dtype": args.dtype, "enable_prefix_caching": False, "load_format": args.load_format,
                 "gpu_memory_utilization": args.gpu_memory_utilization}
    if args.kv_cache_memory is not None:
        engine_kw["kv_cache_memory"] = args.kv_cache_memory

    from pagedserve import LLM

    llm = LLM(**engine_kw, max_num_seqs=max(concs))
    vocab = llm.engine.args.vocab_size
    device = str(llm.engine.device)
    name = llm.engine.served_model_name
    rows = []
    serve_args = ["--max-model-len", str(args.max_model_len), "--max-num-seqs", str(max(concs)), "--device",
                  args.device, "--dtype", args.dtype, "--load-format", args.load_format, "--no-enable-prefix-caching",
                  "--gpu-memory-utilization", str(args.gpu_memory_utilization),
                  "--disable-log-requests"]
    if args.kv_cache_memory is not None:
        serve_args += ["--kv-cache-memory", str(args.kv_cache_memory)]
    env = {"PAGEDSERVE_NUM_THREADS": str(args.server_threads)} if args.server_threads else None
    with ServerProcess(serve_args, model=args.model, env=env) as srv:
        import httpx

        pids = {"server": srv.proc.pid, "engine": httpx.get(srv.url + "/health").json()["engine_pid"]}
        for c, n in zip(concs, nums):
            prompts = make_prompts(n, args.input_len, vocab, args.seed + c)
            offs, cls, https = [], [], []
            for rep in range(args.repeats):
                offs.append(run_offline(engine_kw, prompts, args.output_len, c, llm))
                cls.append(run_offline_closed_loop(llm, prompts, args.output_len, c))
                https.append(asyncio.run(_http_run(srv.url, name, prompts, args.output_len, c, pids)))
                off, cl, http = offs[-1], cls[-1], https[-1]
                assert http["output_tokens"] == off["output_tokens"] == cl["output_tokens"] == n * args.output_len
                print(f"  C={c} #{rep}: offline {off['tok_per_s']:.1f} tok/s ({off['cpu_cores_busy']} cores busy), "
                      f"closed loop {cl['tok_per_s']:.1f}, http {http['tok_per_s']:.1f} tok/s "
                      f"(cores busy {http['cpu_cores_busy']})", flush=True)
            # Each http run is paired with the offline run just before it; the ratio is the median pair's.
            pair_ratios = [h["tok_per_s"] / o["tok_per_s"] for o, h in zip(offs, https)]
            mid = sorted(range(len(offs)), key=lambda i: pair_ratios[i])[(len(offs) - 1) // 2]
            off, http = offs[mid], https[mid]
            rows.append({"concurrency": c, "num_prompts": n, "input_len": args.input_len,
                         "output_len": args.output_len, "offline": off, "http": http,
                         "ratio": statistics.median(pair_ratios), "pair_ratios": pair_ratios,
                         "offline_closed_loop": cls[mid],
                         "ratio_cl": statistics.median(h["tok_per_s"] / o["tok_per_s"] for o, h in zip(cls, https)),
                         "runs": {"offline": [r["tok_per_s"] for r in offs], "offline_closed_loop": [r["tok_per_s"] for r in cls],
                                  "http": [r["tok_per_s"] for r in https]}})

    print()
    print(f"server overhead: {name} on {device} ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}); {args.input_len} in / {args.output_len} out tokens; "
          f"{args.repeats} paired run(s), median ratio (row: the lower-middle pair)")
    hdr = f"{'conc':>5} {'reqs':>5} {'tokens':>7} {'offline tok/s':>14} {'closed-loop':>12} {'http tok/s':>11} " \
          f"{'ratio':>6} {'ratio_cl':>8} {'TTFT p50':>9} {'ITL p50':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        h = r["http"]
        print(f"{r['concurrency']:>5} {r['num_prompts']:>5} {h['output_tokens']:>7} {r['offline']['tok_per_s']:>14.1f} "
              f"{r['offline_closed_loop']['tok_per_s']:>12.1f} {h['tok_per_s']:>11.1f} {r['ratio']:>6.3f} "
              f"{r['ratio_cl']:>8.3f} {h['ttft_p50_s'] * 1e3:>7.0f}ms "
              f"{(h['itl_p50_s'] or 0) * 1e3:>6.1f}ms")
    for r in rows:
        print(f"  C={r['concurrency']}: per-pair ratios " + ", ".join(f"{x:.3f}" for x in r["pair_ratios"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": name, "device": device, "cpu_count": os.cpu_count(),
                               "torch": torch.__version__, "target_ratio": 0.9, "server_threads": args.server_threads,
                               "rows": rows}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
