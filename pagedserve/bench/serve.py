"""`pagedserve bench serve`: load-test any OpenAI-compatible server over a sweep of loads."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass

from pagedserve.errors import ConfigError, InvalidRequestError

DEFAULT_CONCURRENCY = "1,2,4,8,16,32,64,128"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target")
    g.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (…/v1 and full endpoint URLs work too)")
    g.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    g.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token (default $OPENAI_API_KEY)")
    g.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take in all (default 300)")

    g = p.add_argument_group("load (one of)")
    m = g.add_mutually_exclusive_group()
    m.add_argument("--concurrency", default=None,
                   help=f"closed-loop sweep: comma list of concurrent streams (default {DEFAULT_CONCURRENCY})")
    m.add_argument("--request-rate", default=None, help="open-loop sweep: comma list of requests/s ('inf' = all at once)")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals: 1 = Poisson, <1 burstier")
    g.add_argument("--max-concurrency", type=int, default=None, help="cap on in-flight requests in rate mode")
    g.add_argument("--num-prompts", default=None,
                   help="requests per level, or a comma list with one count per level "
                        "(default: 4 × concurrency, ≥ 16; rate mode 200; unlimited with --duration)")
    g.add_argument("--duration", type=float, default=None, help="seconds per level: stop sending new requests after it")
    g.add_argument("--workers", default="auto",
                   help="load-generator processes, each with its own event loop and connections: N or 'auto' "
                        "(one per 64 concurrent streams, at most the usable cores − 1; 1 = in this process)")
    g.add_argument("--warmup", type=int, default=1, help="unmeasured requests before the sweep (default 1)")
    g.add_argument("--ready-timeout", type=float, default=600.0,
                   help="seconds warm-up requests retry while the server answers 503 (loading)")

    g = p.add_argument_group("workload")
    g.add_argument("--dataset", default="random", help="random | sharegpt:FILE | jsonl:FILE")
    g.add_argument("--input-len", type=int, default=256, help="random: prompt tokens (after the shared prefix)")
    g.add_argument("--output-len", type=int, default=None, help="max_tokens per request (default 128; sharegpt: the reply's length)")
    g.add_argument("--range-ratio", type=float, default=0.0, help="random: lengths uniform in [len·(1−r), len·(1+r)]")
    g.add_argument("--prefix-len", type=int, default=0, help="random: tokens of a prefix shared by all prompts")
    g.add_argument("--ignore-eos", action="store_true", help="generate exactly max_tokens (sends ignore_eos)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--tokenizer", default=None, help="for prompt lengths and counting when a server sends no usage (default: the embedded model's)")
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("report")
    g.add_argument("--slo", default=None, help="per-request SLO for goodput and the knee, e.g. ttft=500ms,tpot=50ms,e2e=10s")
    g.add_argument("--slo-target", type=float, default=0.99, help="fraction of requests a level must keep within the SLO (default 0.99)")
    g.add_argument("--save-json", default=None, metavar="PATH", help="summary and every per-request record")
    g.add_argument("--save-csv", default=None, metavar="PATH", help="one row per level (+ PATH_requests.csv per request)")
    g.add_argument("--save-text", action="store_true", help="keep generated text in the JSON records")
    g.add_argument("--plot", default=None, metavar="DIR", help="write throughput/TTFT/latency-CDF PNGs to DIR")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_list(text: str, name: str, kind=float) -> list:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            v = math.inf if part.lower() == "inf" and kind is float else kind(part)
        except ValueError:
            raise InvalidRequestError(f"--{name}: {part!r} is not a number", param=name) from None
        if v <= 0:
            raise InvalidRequestError(f"--{name}: values must be > 0", param=name)
        out.append(v)
    if not out:
        raise InvalidRequestError(f"--{name} is empty", param=name)
    return out


def run(args: argparse.Namespace) -> int:
    return asyncio.run(main(args))


async def resolve_model(url: str, api_key: str | None, timeout: float) -> str:
    import httpx

    base = url.rstrip("/")
    for suffix in ("/chat/completions", "/completions"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    if not base.endswith("/v1"):
        base += "/v1"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(timeout=min(timeout, 30.0), trust_env=False) as c:
            r = await c.get(base + "/models", headers=headers)
    except httpx.HTTPError as e:
        raise ConfigError(f"cannot reach the server at {url}: {type(e).__name__}: {e}",
                          hint="start it (pagedserve serve) or pass --url") from e
    if r.status_code == 200 and r.json().get("data"):
        return r.json()["data"][0]["id"]
    raise ConfigError(f"GET {base}/models answered {r.status_code}", hint="pass --model NAME")


def resolve_workers(text: str, mode: str, loads: list, max_concurrency: int | None, counts: list | None) -> int:
    from pagedserve.bench.load_processes import auto_workers

    if str(text).strip().lower() == "auto":
        return auto_workers(mode, loads, max_concurrency, counts)
    try:
        n = int(text)
    except ValueError:
        raise InvalidRequestError(f"--workers: {text!r} is not a number or 'auto'", param="workers") from None
    if n < 1:
        raise InvalidRequestError("--workers must be ≥ 1", param="workers")
    return n


@dataclass
class Sweep:
    """The load levels a run sweeps, from the command line, checked before anything is sent."""
    mode: str  # concurrency | rate
    loads: list
    counts: list | None  # prompts per level (one for all, or one each); None: from --duration or the load
    workers: int

    def prompts(self, i: int, load: float, duration: float | None) -> int | None:
        if self.counts is not None:
            return self.counts[i] if len(self.counts) > 1 else self.counts[0]
        if duration:
            return None
        return max(16, 4 * int(load)) if self.mode == "concurrency" else 200

    def streams(self, max_concurrency: int | None) -> int:
        return max(int(x) for x in self.loads) if self.mode == "concurrency" else (max_concurrency or 256)


def parse_sweep(args: argparse.Namespace) -> Sweep:
    if args.request_rate:
        mode, loads = "rate", parse_list(args.request_rate, "request-rate")
    else:
        mode, loads = "concurrency", parse_list(args.concurrency or DEFAULT_CONCURRENCY, "concurrency", int)
    counts = parse_list(str(args.num_prompts), "num-prompts", int) if args.num_prompts is not None else None
    if counts is not None and len(counts) not in (1, len(loads)):
        raise InvalidRequestError(f"--num-prompts has {len(counts)} counts for {len(loads)} load levels",
                                  param="num_prompts", hint="give one count, or one per level")
    if args.burstiness <= 0:
        raise InvalidRequestError("--burstiness must be > 0", param="burstiness")
    if mode == "rate" and counts is None and args.duration and any(math.isinf(x) for x in loads):
        raise InvalidRequestError("--request-rate inf with --duration needs --num-prompts (an endless burst otherwise)",
                                  param="num_prompts")
    return Sweep(mode, loads, counts, resolve_workers(args.workers, mode, loads, args.max_concurrency, counts))


@contextlib.contextmanager
def first_sigint_stops(stop: asyncio.Event, err):
    """First Ctrl-C: stop the level, keep what completed; a second one: at once (the default handler)."""
    import signal

    loop = asyncio.get_running_loop()

    def on_sigint() -> None:
        stop.set()
        err.print("[yellow]interrupted: stopping the load generator; the table shows what completed[/yellow]")
        loop.remove_signal_handler(signal.SIGINT)

    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
        installed = True
    except (RuntimeError, ValueError, NotImplementedError):  # not the main thread, or no signals here
        installed = False
    try:
        yield
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGINT)


async def warm_up(args: argparse.Namespace, dataset, pool, url: str, model: str, stop: asyncio.Event, err) -> None:
    """Short requests before the clock starts; a server still loading (503) is waited for."""
    from pagedserve.bench.client import RequestRecord, build_body, send_request

    warm = dataset.stream(args.seed + 10_000)
    ready_by = time.monotonic() + args.ready_timeout
    for _ in range(args.warmup):
        req = next(warm)
        req.output_len = min(req.output_len, 16)
        body = build_body(req, model, args.endpoint, args.ignore_eos, args.temperature)
        while True:  # 503 = still loading (a server answers HTTP before its model is ready): wait
            rec = RequestRecord(-1)
            await send_request(pool, url, body, rec, time.perf_counter(), args.timeout)
            if rec.error_kind != "http_503" or time.monotonic() > ready_by or stop.is_set():
                break
            await asyncio.sleep(1.0)
        if rec.error_kind == "connection":
            raise ConfigError(f"cannot reach {url}: {rec.error}", hint="is the server running? see --url")
        if not rec.success:
            err.print(f"[yellow]warm-up request failed: {rec.error_kind}: {rec.error}[/yellow]")


async def run_levels(args: argparse.Namespace, sweep: Sweep, dataset, settings, pool, workers, slo,
                     stop: asyncio.Event, err) -> tuple[list, list]:
    """Each level in turn (until Ctrl-C): its results and summaries."""
    from pagedserve.bench.load_level import LevelSpec
    from pagedserve.bench.metrics import summarize

    results, summaries = [], []
    tokenizer = getattr(dataset, "tok", None)
    for i, load in enumerate(sweep.loads):
        if stop.is_set():
            break
        n = sweep.prompts(i, load, args.duration)
        stream = dataset.stream(args.seed + 1 + i)
        # Prompts are made before the clock starts; with --duration alone they are made on the fly.
        reqs = iter(list(itertools.islice(stream, n))) if n is not None else stream
        spec = LevelSpec(sweep.mode, load, n, args.duration, args.burstiness, args.max_concurrency, args.seed + i)
        if workers is not None:
            res = await _run_workers(spec, settings, reqs, pool, workers, err, args.no_progress, stop)
        else:
            res = await _run_with_progress(spec, settings, reqs, pool, err, args.no_progress, stop)
        _count_missing_tokens(res.records, tokenizer, args.tokenizer)
        results.append(res)
        summaries.append(summarize(res.records, res.duration, slo))
        for w in res.client["warnings"]:
            err.print(f"[yellow]warning:[/yellow] {w}")
    return results, summaries


def write_report(args: argparse.Namespace, sweep: Sweep, results: list, summaries: list, slo, config: dict,
                 interrupted: bool, out) -> None:
    """The table on the console, then the JSON, CSV and plots asked for."""
    from pagedserve.bench import report

    mode, loads = sweep.mode, sweep.loads[: len(summaries)]
    analysis = report.analyze(mode, loads, summaries, slo, args.slo_target,
                              client_bound=[r.client.get("client_bound", False) for r in results])
    report.print_report(out, mode, loads, summaries, analysis, [r.client for r in results], [r.server for r in results])
    if interrupted:
        out.print(f"[bold yellow]interrupted:[/bold yellow] partial results — {len(summaries)} level(s), the last one "
                  f"cut short (requests in flight at Ctrl-C are not counted)")
    if args.save_json:
        report.to_json(args.save_json, config, mode, results, summaries, analysis, args.save_text)
        out.print(f"wrote {args.save_json}")
    if args.save_csv:
        out.print("wrote " + ", ".join(report.to_csv(args.save_csv, mode, results, summaries)))
    if args.plot:
        out.print("wrote " + ", ".join(report.plot(args.plot, mode, loads, summaries, results, analysis)))


async def main(args: argparse.Namespace) -> int:
    import logging

    from rich.console import Console

    from pagedserve.bench.client import StreamPool, endpoint_url
    from pagedserve.bench.datasets import make_dataset
    from pagedserve.bench.load_level import RequestSettings
    from pagedserve.bench.metrics import parse_slo

    for name in ("httpx", "httpcore"):  # one INFO line per request would drown the report
        logging.getLogger(name).setLevel(logging.WARNING)
    out = Console() if sys.stdout.isatty() else Console(width=160)
    err = Console(stderr=True)
    slo = parse_slo(args.slo)
    sweep = parse_sweep(args)
    url = endpoint_url(args.url, args.endpoint)
    model = args.model or await resolve_model(args.url, args.api_key, args.timeout)
    dataset = make_dataset(args.dataset, tokenizer_name=args.tokenizer, input_len=args.input_len,
                           output_len=args.output_len, range_ratio=args.range_ratio,
                           prefix_len=args.prefix_len, seed=args.seed)
    settings = RequestSettings(url=url, model=model, endpoint=args.endpoint, ignore_eos=args.ignore_eos,
                               temperature=args.temperature, timeout=args.timeout, keep_text=args.save_text)
    streams = sweep.streams(args.max_concurrency)
    pool = StreamPool(min(streams, 64) if sweep.workers > 1 else streams, args.timeout, args.api_key)
    workers = None
    stop = asyncio.Event()
    try:
        with first_sigint_stops(stop, err):
            if sweep.workers > 1:
                from pagedserve.bench.load_processes import WorkerPool

                workers = WorkerPool(sweep.workers, args.timeout, args.api_key, streams)
                err.print(f"load generator: {sweep.workers} worker processes (pids {', '.join(map(str, workers.pids))})")
            if args.warmup:
                await warm_up(args, dataset, pool, url, model, stop, err)
            results, summaries = await run_levels(args, sweep, dataset, settings, pool, workers, slo, stop, err)
    finally:
        if workers is not None:
            workers.close()
        await pool.aclose()
    interrupted = stop.is_set()
    if interrupted and not summaries:
        err.print("interrupted before any level ran: nothing to report")
        return 130
    config = {k: v for k, v in vars(args).items() if k not in ("func", "api_key")} | {
        "url": url, "model": model, "workers": sweep.workers, "interrupted": interrupted}
    write_report(args, sweep, results, summaries, slo, config, interrupted, out)
    return 130 if interrupted else 0


async def _run_workers(spec, settings, reqs, pool, workers, console, disabled: bool, stop):
    """One level over the worker processes; the parent only deals prompts, scrapes /metrics and merges."""
    from pagedserve.bench.load_level import finish_level, scrape_server_metrics, server_side

    before: dict = {}

    async def scrape_before() -> None:
        before["m"] = await scrape_server_metrics(pool, settings.url)

    t = time.perf_counter()
    if disabled or not console.is_terminal:
        res = await workers.run_level(spec, settings, reqs, stop, before_start=scrape_before)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("errors {task.fields[errors]}"), console=console, refresh_per_second=4) as progress:
            task = progress.add_task(spec.label, total=spec.num_prompts, errors=0)
            errors = 0

            def on_records(batch) -> None:
                nonlocal errors
                errors += sum(not r.success for r in batch)
                progress.update(task, advance=len(batch), errors=errors)

            res = await workers.run_level(spec, settings, reqs, stop, on_records, scrape_before)
    server = None
    if before.get("m"):
        server = server_side(before["m"], await scrape_server_metrics(pool, settings.url))
    level = finish_level(spec, res.records, res.raw, res.wall0, res.wall, server, res.failures, res.interrupted)
    if disabled or not console.is_terminal:
        ok = sum(r.success for r in level.records)
        who = f"{len(res.raw)} of {len(res.raw) + len(res.failures)} workers" if res.failures else f"{len(res.raw)} workers"
        console.print(f"{spec.label}: {ok}/{len(level.records)} ok in {time.perf_counter() - t:.1f}s ({who})")
    return level


async def _run_with_progress(spec, settings, reqs, pool, console, disabled: bool, stop=None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pagedserve.bench.load_level import run_level

    if disabled or not console.is_terminal:
        t = time.perf_counter()
        res = await run_level(spec, settings, reqs, pool, stop=stop)
        ok = sum(r.success for r in res.records)
        console.print(f"{spec.label}: {ok}/{len(res.records)} ok in {time.perf_counter() - t:.1f}s")
        return res
    errors = 0
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("in flight {task.fields[inflight]}  errors {task.fields[errors]}"),
                  console=console, refresh_per_second=4, transient=False) as progress:
        task = progress.add_task(spec.label, total=spec.num_prompts, inflight=0, errors=0)

        def on_done(rec, in_flight):
            nonlocal errors
            errors += not rec.success
            progress.update(task, advance=1, inflight=in_flight, errors=errors)

        return await run_level(spec, settings, reqs, pool, on_done, stop)


def _count_missing_tokens(records, tokenizer, tokenizer_name) -> None:
    """Tokenizer fallback for servers that send no usage: count the prompt and the generated text."""
    missing = [r for r in records if r.success and r.output_tokens is None]
    if not missing:
        return
    tok = tokenizer
    if tok is None:
        from pagedserve.bench.datasets import load_tokenizer

        tok = load_tokenizer(tokenizer_name)
    for r in missing:
        r.output_tokens = len(tok(r.generated_text, add_special_tokens=False).input_ids)
        if r.prompt_tokens is None and r.expected_prompt_len >= 0:
            r.prompt_tokens = r.expected_prompt_len
        r.token_source = "tokenizer"


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("json", help="a file written by `bench serve --save-json`")
    p.add_argument("--slo", default=None, help="SLO to judge by (default: the run's own)")
    p.add_argument("--slo-target", type=float, default=None, help="default: the run's own (0.99)")
    p.add_argument("--save-csv", default=None, metavar="PATH")
    p.add_argument("--plot", default=None, metavar="DIR")


def report_run(args: argparse.Namespace) -> int:
    """`bench report FILE`: re-analyse a saved run (another SLO, new plots) without re-running it."""
    import dataclasses
    import json
    from pathlib import Path

    from rich.console import Console

    from pagedserve.bench import report
    from pagedserve.bench.client import RequestRecord
    from pagedserve.bench.metrics import parse_slo, summarize
    from pagedserve.bench.load_level import LevelResult, LevelSpec

    try:
        doc = json.loads(Path(args.json).read_text())
        mode, cfg = doc["mode"], doc.get("config", {})
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"cannot read a bench serve result from {args.json}: {e}") from e
    slo = parse_slo(args.slo if args.slo is not None else cfg.get("slo"))
    target = args.slo_target if args.slo_target is not None else cfg.get("slo_target", 0.99)
    fields = {f.name for f in dataclasses.fields(RequestRecord)}
    results, summaries, loads = [], [], []
    for lv in doc["levels"]:
        load = math.inf if lv["load"] == "inf" else float(lv["load"])
        records = [RequestRecord(**{k: v for k, v in r.items() if k in fields}) for r in lv["requests"]]
        res = LevelResult(LevelSpec(mode, load, len(records)), records, lv["summary"]["duration_s"],
                          lv.get("started_at", 0.0), lv.get("client", {}), lv.get("server"))
        results.append(res)
        summaries.append(summarize(records, res.duration, slo))
        loads.append(load)
    bound = [bool(r.client.get("client_bound", r.client.get("warnings"))) for r in results]
    analysis = report.analyze(mode, loads, summaries, slo, target, client_bound=bound)
    out = Console() if sys.stdout.isatty() else Console(width=160)
    report.print_report(out, mode, loads, summaries, analysis, [r.client for r in results if r.client],
                        [r.server for r in results])
    if args.save_csv:
        out.print("wrote " + ", ".join(report.to_csv(args.save_csv, mode, results, summaries)))
    if args.plot:
        out.print("wrote " + ", ".join(report.plot(args.plot, mode, loads, summaries, results, analysis)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    from pagedserve.cli import main as _main

    sys.exit(_main(["bench", "serve", *sys.argv[1:]]))
