"""Does `pagedserve bench serve` agree with a peer load generator on the same server?

    # GPU: a 7B dummy-weights pagedserve server, our client vs vLLM's (`vllm bench serve`)
    PYTHONPATH=/tmp/peer-site python benchmarks/bench_agreement.py --pagedserve-dummy Qwen/Qwen2.5-7B-Instruct
    python benchmarks/bench_agreement.py --url http://127.0.0.1:8000 --model NAME --tokenizer DIR
    python benchmarks/bench_agreement.py --server-cmd "vllm serve M --port {port}" --model M --tokenizer M
    # CPU: the mock server (known timing), small numbers; and the client-ceiling self-check
    python benchmarks/bench_agreement.py --concurrency 1,64,256 --output-len 32
    ... --repeat 3 --prompts-per-stream 8   # GPU: alternate the clients 3x per level, compare medians
    ... --range-ratio 0.5                   # both clients draw lengths in [64, 192]: no lockstep waves
    python benchmarks/bench_agreement.py --self-check

Agreement: per level (default 1, 64, 256, 512 streams; 128-token random prompts, 128 new
tokens, ignore_eos, 4 x C prompts) our client (`--workers auto`) and the peer run against
the same server, one after the other, and the table shows output throughput, TTFT P50/P99
and TPOT P50 side by side with ours/peer ratios. Targets (issue 16): throughput within 3%,
TTFT/TPOT within 5%. The peer is `vllm bench serve` when vLLM imports (put it on
PYTHONPATH or pass --peer-pythonpath; its CLI entry point is vllm.entrypoints.cli.main).
Otherwise (a CPU box) the script installs vLLM's client on demand into a temporary
directory: the vllm wheel without dependencies plus the few pure-Python modules its
`bench serve` imports (no CUDA torch; --no-install-vllm-client to skip). guidellm is
the last resort when it installs cleanly: pip (dry run) says what it would install;
guidellm 0.8 pulls a CUDA torch build (~6 GB of wheels), so it is skipped with that
reason. None of them is ever a project dependency.

Self-check (--self-check, CPU-measurable): against the mock server at several hundred
streams, our client's output throughput vs the truth (the tokens the mock wrote over the
span from the first request's arrival to its last write, on its own clock), with
--workers 1 and --workers N: where one event loop is the ceiling, N workers lift it.

Writes benchmarks/results/bench_agreement.json (or --out).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MOCK = ROOT / "tests" / "doubles" / "mock_openai_server.py"
RESULTS = ROOT / "benchmarks" / "results"
THROUGHPUT_TOL, LATENCY_TOL = 0.03, 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode} before it was ready")
        for path in ("/health", "/v1/models"):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + path, timeout=5).status_code == 200:
                    return
        time.sleep(0.5)
    raise SystemExit(f"the server at {url} was not ready within {timeout:.0f}s")


@contextlib.contextmanager
def server(args):
    """Yields (url, model name, tokenizer) for the server under test, started here unless --url."""
    if args.tokenizer is None and not (args.pagedserve_dummy or args.vllm_dummy):  # both clients need one to make the prompts
        from pagedserve.model.default_model import default_model_dir

        args.tokenizer = str(default_model_dir())
    if args.url:
        yield args.url.rstrip("/"), args.model, args.tokenizer
        return
    port = free_port()
    env = None
    shape = args.pagedserve_dummy or args.vllm_dummy
    if shape:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from gpu_serving import dummy_model_dir

        from pagedserve.model.default_model import default_model_dir

        model_dir = dummy_model_dir(shape, args.tokenizer or str(default_model_dir()))
        common = [str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--load-format", "dummy",
                  "--served-model-name", shape, "--max-num-seqs", str(args.max_num_seqs), *shlex.split(args.serve_args)]
        if args.pagedserve_dummy:
            cmd = [sys.executable, "-m", "pagedserve.cli", "serve", *common, "--disable-log-requests"]
        else:  # the same dummy weights' shape behind vLLM's own server
            cmd, env = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", *common], peer_env(args)
        model, tokenizer = shape, str(model_dir)
    elif args.server_cmd:
        cmd, model, tokenizer = shlex.split(args.server_cmd.format(port=port)), args.model, args.tokenizer
    else:
        cmd = [sys.executable, str(MOCK), "--port", str(port), "--ttft", str(args.mock_ttft), "--itl",
               str(args.mock_itl)]
        model, tokenizer = "mock", args.tokenizer
    print("$", " ".join(cmd), flush=True)
    log = tempfile.NamedTemporaryFile("w+", prefix="agreement-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, args.ready_timeout)
        yield url, model, tokenizer
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        print(f"server log: {log.name}")


# -- our client --------------------------------------------------------------------------
def run_ours(url: str, model: str, tokenizer: str | None, c: int, n: int, args, workers: str, out: Path,
             extra: list[str] = ()) -> dict:
    path = out / f"ours_c{c}_w{workers}.json"
    cmd = [sys.executable, "-m", "pagedserve.cli", "bench", "serve", "--url", url, "--concurrency", str(c),
           "--num-prompts", str(n), "--input-len", str(args.input_len), "--output-len", str(args.output_len),
           *(["--range-ratio", str(args.range_ratio)] if args.range_ratio else []),
           "--ignore-eos", "--temperature", str(args.temperature), "--warmup", "1", "--no-progress", "--workers",
           workers, "--save-json", str(path),
           "--timeout", str(args.request_timeout), *(["--model", model] if model else []),
           *(["--tokenizer", tokenizer] if tokenizer else []), *extra]
    print("$", " ".join(cmd), flush=True)
    t = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.level_timeout)
    if proc.returncode != 0:
        raise SystemExit(f"bench serve failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    lv = json.loads(path.read_text())["levels"][0]
    s = lv["summary"]
    return {"output_throughput": s["output_throughput"], "ttft_mean_ms": s["ttft_ms"]["mean"],
            "ttft_p50_ms": s["ttft_ms"]["p50"],
            "ttft_p99_ms": s["ttft_ms"]["p99"], "tpot_p50_ms": s["tpot_ms"]["p50"], "completed": s["completed"],
            "failed": s["failed"], "client_bound": lv["client"].get("client_bound"),
            "workers": lv["client"].get("workers"), "client_cpu_peak": lv["client"].get("cpu_peak_fraction"),
            "output_tokens": s["output_tokens"], "duration_s": s["duration_s"], "tpot_mean_ms": s["tpot_ms"]["mean"],
            "wall_s": time.monotonic() - t}


def server_scrape(url: str) -> dict | None:
    """Sums/counts of the server's vLLM-named latency histograms (GET /metrics), or None."""
    import httpx

    from pagedserve.bench.load_level import _PROM

    try:
        r = httpx.get(url + "/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    out: dict[str, float] = {}
    for name, kind, value in _PROM.findall(r.text) if r.status_code == 200 else ():
        out[f"{name}_{kind}"] = out.get(f"{name}_{kind}", 0.0) + float(value)
    return out or None


def with_server_view(url: str, run) -> dict:
    """Run one client; add the server's own mean TTFT over that run (the reference both clients are judged by)."""
    from pagedserve.bench.load_level import server_side

    before = server_scrape(url)
    res = run()
    view = server_side(before, server_scrape(url)) if before else None
    for key in ("ttft_mean_ms", "tpot_mean_ms", "e2e_mean_ms"):
        if view and key in view:
            res["server_" + key] = view[key]
    return res


# -- peers -------------------------------------------------------------------------------
def peer_env(args) -> dict:
    env = dict(os.environ)
    if args.peer_pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([args.peer_pythonpath, *filter(None, [env.get("PYTHONPATH")])])
    return env


def vllm_available(args) -> bool:
    code = "import vllm.entrypoints.cli.main"
    return subprocess.run([sys.executable, "-c", code], env=peer_env(args), capture_output=True).returncode == 0


def run_vllm(url: str, model: str, tokenizer: str | None, c: int, n: int, args, out: Path) -> dict:
    name = f"vllm_c{c}.json"
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "openai",
           "--base-url", url, "--model", model, *(["--tokenizer", tokenizer] if tokenizer else []),
           "--dataset-name", "random", "--random-input-len", str(args.input_len), "--random-output-len",
           str(args.output_len), "--ignore-eos", "--temperature", str(args.temperature),  # else the server's default
           "--max-concurrency", str(c), "--num-prompts", str(n),
           *(["--random-range-ratio", str(args.range_ratio)] if args.range_ratio else []),
           "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99", "--disable-tqdm",
           "--save-result", "--result-dir", str(out), "--result-filename", name]
    print("$", " ".join(cmd), flush=True)
    t = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.level_timeout, env=peer_env(args))
    if proc.returncode != 0:
        raise SystemExit(f"vllm bench serve failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    r = json.loads((out / name).read_text())
    return {"output_throughput": r["output_throughput"], "ttft_mean_ms": r["mean_ttft_ms"],
            "ttft_p50_ms": r["median_ttft_ms"],
            "ttft_p99_ms": r["p99_ttft_ms"], "tpot_p50_ms": r["median_tpot_ms"], "completed": r["completed"],
            "failed": n - r["completed"], "output_tokens": r.get("total_output_tokens"),
            "duration_s": r.get("duration"), "tpot_mean_ms": r.get("mean_tpot_ms"), "wall_s": time.monotonic() - t}


VLLM_CLIENT_DIR = Path(tempfile.gettempdir()) / "pagedserve-vllm-client"
_MODULE_TO_PACKAGE = {"zmq": "pyzmq", "cpuinfo": "py-cpuinfo", "yaml": "pyyaml", "PIL": "pillow"}


def install_vllm_client(target: Path, version: str) -> tuple[bool, str]:
    """vLLM's load generator without vLLM's engine dependencies (no CUDA torch): the vllm wheel with
    --no-deps into `target`, then, one at a time, each module `vllm bench serve --help` still lacks
    (versions pinned as in ../shared/peers/vllm/requirements.txt when listed there). Never touches the
    project's environment; PYTHONPATH=target puts it in reach."""
    req = ROOT.parent / "shared" / "peers" / "vllm" / "requirements.txt"
    pins = {}
    if req.exists():
        for line in req.read_text().splitlines():
            name, _, ver = line.strip().partition("==")
            if ver and not name.startswith("#"):
                pins[name.lower().replace("_", "-")] = line.strip()

    def pip(spec: str) -> None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), spec],
                       capture_output=True, text=True, timeout=900, check=True)

    env = dict(os.environ, PYTHONPATH=str(target))
    try:
        if not (target / "vllm").is_dir():
            print(f"installing vLLM {version}'s client into {target} (no dependencies) …", flush=True)
            pip(f"vllm=={version}")
        for _ in range(60):
            proc = subprocess.run([sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--help"],
                                  capture_output=True, text=True, env=env, timeout=300)
            if proc.returncode == 0:
                return True, f"vLLM {version}'s bench serve from {target}"
            missing = re.findall(r"No module named '([^'.]+)", proc.stderr)
            if not missing or missing[-1] == "vllm":
                return False, f"vllm bench serve does not start: {proc.stderr.strip().splitlines()[-1:]}"
            pkg = _MODULE_TO_PACKAGE.get(missing[-1], missing[-1])
            pip(pins.get(pkg.lower().replace("_", "-"), pkg))
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        return False, f"installing vLLM's client failed: {e}"
    return False, "vllm bench serve still lacks modules after 60 installs"


def guidellm_clean_install() -> tuple[bool, str]:
    """Would `pip install guidellm` into a fresh venv stay clean (no torch / CUDA wheels)? Asks pip (dry run)."""
    with tempfile.TemporaryDirectory(prefix="guidellm-check-") as d:
        report = Path(d) / "report.json"
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                               "--report", str(report), "guidellm"], capture_output=True, text=True, timeout=900)
        if proc.returncode != 0 or not report.exists():
            return False, f"pip cannot resolve guidellm: {proc.stderr.strip().splitlines()[-1:]}"
        names = [i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]]
    heavy = sorted(n for n in names if n == "torch" or n.startswith("nvidia-") or n == "triton")
    if heavy:
        return False, (f"guidellm would pull {len(names)} packages including {', '.join(heavy[:4])}"
                       f"{'…' if len(heavy) > 4 else ''} (a CUDA torch build, GBs of wheels)")
    return True, f"{len(names)} packages"


def choose_peer(args) -> tuple[str | None, str]:
    if args.peer in ("auto", "vllm") and vllm_available(args):
        return "vllm", f"vllm bench serve (PYTHONPATH {args.peer_pythonpath or 'as is'})"
    if args.peer in ("auto", "vllm") and args.install_vllm_client:
        ok, why = install_vllm_client(VLLM_CLIENT_DIR, args.vllm_version)
        if ok:
            args.peer_pythonpath = str(VLLM_CLIENT_DIR)
            return "vllm", why
        print(f"vLLM's client: {why}", flush=True)
    if args.peer == "vllm":
        return None, "vLLM is not importable (pass --peer-pythonpath, or --install-vllm-client)"
    if args.peer in ("auto", "guidellm"):
        ok, why = guidellm_clean_install()
        if not ok:
            return None, f"vLLM is not importable and guidellm does not install cleanly: {why}"
        return None, (f"guidellm would install cleanly ({why}) but this script has no guidellm runner yet; "
                      f"install vLLM's client instead")
    return None, "no peer requested (--peer none)"


# -- reports -----------------------------------------------------------------------------
METRICS = (("output_throughput", "out tok/s", THROUGHPUT_TOL), ("ttft_p50_ms", "TTFT P50 ms", LATENCY_TOL),
           ("ttft_p99_ms", "TTFT P99 ms", LATENCY_TOL), ("tpot_p50_ms", "TPOT P50 ms", LATENCY_TOL))


def print_agreement(rows: list[dict], peer: str | None) -> None:
    head = f"{'C':>5}"
    for _, label, _ in METRICS:
        head += f" | {label:>12} ours" + (f" {'peer':>9} {'ratio':>6}" if peer else "")
    print(head)
    for r in rows:
        line = f"{r['concurrency']:>5}"
        for key, _, tol in METRICS:
            a = r["ours"][key]
            line += f" | {a:>17.1f}"
            if peer:
                b = r["peer"][key]
                ratio = a / b if a and b else float("nan")
                ok = abs(ratio - 1) <= tol
                r.setdefault("ratios", {})[key] = ratio
                r.setdefault("within_target", {})[key] = ok
                line += f" {b:>9.1f} {ratio:>5.3f}{'' if ok else '!'}"
        if r["ours"].get("client_bound"):
            line += "  (our client flagged client-bound)"
        if r["ours"].get("runs", 1) > 1:
            line += f"  (medians of {r['ours']['runs']}; throughput spread ours {r['ours']['throughput_spread']:.0%}"
            line += f", peer {r['peer']['throughput_spread']:.0%})" if peer else ")"
        print(line)
    if any("server_ttft_mean_ms" in r["ours"] for r in rows):
        # The server's own histograms are the reference: a client that disagrees with them measures itself.
        print("\nEach client's means vs the server's own over that client's run (/metrics), and what it counted:")
        for r in rows:
            for who, m in (("ours", r["ours"]), (peer, r.get("peer"))):
                if not m:
                    continue
                print(f"{r['concurrency']:>5} {who:>5}: TTFT {m['ttft_mean_ms']:8.1f} (server "
                      f"{m.get('server_ttft_mean_ms', 0):8.1f})  TPOT {m.get('tpot_mean_ms') or 0:6.2f} (server "
                      f"{m.get('server_tpot_mean_ms', 0):6.2f})  {m.get('output_tokens')} tokens in "
                      f"{m.get('duration_s') or 0:.2f} s")
    if peer:
        print(f"ratio = ours / {peer}; '!' = outside the target (throughput ±{THROUGHPUT_TOL:.0%}, "
              f"TTFT/TPOT ±{LATENCY_TOL:.0%})")


def median_run(runs: list[dict]) -> dict:
    """Per-metric medians over repeated runs of one client, and the throughput spread (max/min - 1): one
    closed-loop run at hundreds of streams can land 25% off the next on the same server."""
    import statistics

    out = dict(runs[0])
    for k, v in runs[0].items():
        vals = [r.get(k) for r in runs]
        if isinstance(v, (int, float)) and not isinstance(v, bool) and all(isinstance(x, (int, float)) for x in vals):
            out[k] = statistics.median(vals)
    tps = [r["output_throughput"] for r in runs]
    out["throughput_spread"] = max(tps) / min(tps) - 1 if min(tps) > 0 else None
    out["runs"] = len(runs)
    return out


def agreement(args, on_level=None) -> dict:
    """Both clients at each level; `on_level(doc)` gets the result so far after every level (the caller
    writes it: a run cut short by a time limit keeps the levels it finished)."""
    out = Path(tempfile.mkdtemp(prefix="agreement-"))
    peer, why = choose_peer(args)
    print(f"peer: {peer or 'skipped'} — {why}", flush=True)
    rows = []
    with server(args) as (url, model, tokenizer):
        for c in [int(x) for x in args.concurrency.split(",")]:
            n = args.prompts_per_stream * c
            runs: dict[str, list[dict]] = {"ours": [], "peer": []}
            for _ in range(args.repeat):  # alternate the clients, so a drift of the server hits both
                runs["ours"].append(with_server_view(url, lambda: run_ours(url, model, tokenizer, c, n, args,
                                                                           args.workers, out)))
                if peer == "vllm":
                    runs["peer"].append(with_server_view(
                        url, lambda: run_vllm(url, model or "mock", tokenizer, c, n, args, out)))
            row = {"concurrency": c, "num_prompts": n}
            for who, rs in runs.items():
                if rs:
                    row[who] = median_run(rs)
                    row[who + "_runs"] = rs
            rows.append(row)
            print(json.dumps(row), flush=True)
            if on_level:
                on_level({"peer": peer, "peer_note": why, "levels": rows, "partial": True})
    print()
    print_agreement(rows, peer)
    return {"peer": peer, "peer_note": why, "levels": rows}


def mock_truth(timings_dir: Path) -> dict:
    """What the mock's processes really did: requests served and the span from the first arrival to the
    last write (their clocks are one: the machine's monotonic clock)."""
    timings = {}
    for f in timings_dir.glob("*.json"):
        timings.update(json.loads(f.read_text()))
    span = max(t["last_at"] for t in timings.values()) - min(t["arrived_at"] for t in timings.values())
    return {"requests": len(timings), "span_s": span}


def self_check(args) -> dict:
    """Our client's throughput vs the mock's truth at several hundred streams, 1 worker vs N."""
    out = Path(tempfile.mkdtemp(prefix="selfcheck-"))
    rows = []
    for c in [int(x) for x in args.self_check_streams.split(",")]:
        for workers in ["1", args.self_check_workers]:
            tdir = Path(tempfile.mkdtemp(prefix="mock-timings-", dir=out))
            mock = subprocess.Popen([sys.executable, str(MOCK), "--port", "0", "--ttft", str(args.mock_ttft),
                                     "--itl", str(args.mock_itl), "--processes", str(args.mock_processes),
                                     "--timings-dir", str(tdir)], stdout=subprocess.PIPE, text=True)
            try:
                url = f"http://127.0.0.1:{int(mock.stdout.readline().split()[1])}"
                n = args.prompts_per_stream * c
                ours = run_ours(url, "mock", args.tokenizer, c, n, args, workers, out, ["--warmup", "0"])
            finally:
                mock.terminate()
                mock.wait(30)
            truth = mock_truth(tdir)
            assert truth["requests"] == n, truth  # every request the client sent, once
            true_tput = truth["requests"] * args.output_len / truth["span_s"]
            rows.append({"streams": c, "workers": ours["workers"], "ours": ours["output_throughput"],
                         "truth": true_tput, "ratio": ours["output_throughput"] / true_tput,
                         "client_bound": ours["client_bound"], "client_cpu_peak": ours["client_cpu_peak"],
                         "ttft_p50_ms": ours["ttft_p50_ms"], "tpot_p50_ms": ours["tpot_p50_ms"]})
            print(json.dumps(rows[-1]), flush=True)
    nominal = args.output_len / (args.mock_ttft + (args.output_len - 1) * args.mock_itl)
    print(f"\nself-check: mock server ({args.mock_processes} processes) ttft {args.mock_ttft}s, itl {args.mock_itl}s, "
          f"{args.output_len} tokens "
          f"(nominal {nominal:.1f} tok/s per stream); truth = tokens the mock wrote / its busy span")
    print(f"{'streams':>7} {'workers':>7} {'ours tok/s':>11} {'truth tok/s':>12} {'ratio':>6} {'client':>8} "
          f"{'CPU peak':>8} {'TPOT P50':>9}")
    for r in rows:
        print(f"{r['streams']:>7} {r['workers']:>7} {r['ours']:>11.0f} {r['truth']:>12.0f} {r['ratio']:>6.3f} "
              f"{'bound' if r['client_bound'] else 'ok':>8} {r['client_cpu_peak']:>8.0%} {r['tpot_p50_ms']:>9.1f}")
    return {"mock": {"ttft": args.mock_ttft, "itl": args.mock_itl, "output_len": args.output_len,
                     "processes": args.mock_processes}, "rows": rows}


def _exit_on_sigterm(signum: int, frame) -> None:
    """A SIGTERM (a harness's time limit) unwinds like an error, so the server's `finally` stops it:
    the server runs in its own session, and one outliving a killed script can hold the GPU."""
    raise SystemExit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("server (default: the mock server)")
    g.add_argument("--url", default=None, help="an already running server")
    g.add_argument("--server-cmd", default=None, help="command that starts the server; {port} is filled in")
    g.add_argument("--pagedserve-dummy", default=None, metavar="SHAPE",
                   help="start `pagedserve serve` with dummy weights of this shape (as benchmarks/gpu_serving.py)")
    g.add_argument("--vllm-dummy", default=None, metavar="SHAPE",
                   help="start `vllm serve` on dummy weights of this HF shape (vLLM from --peer-pythonpath)")
    g.add_argument("--serve-args", default="", help="extra server flags with --pagedserve-dummy/--vllm-dummy")
    g.add_argument("--max-num-seqs", type=int, default=512)
    g.add_argument("--model", default=None)
    g.add_argument("--tokenizer", default=None, help="tokenizer dir for the prompts (default: the embedded model's)")
    g.add_argument("--ready-timeout", type=float, default=600)
    g.add_argument("--mock-ttft", type=float, default=0.2)
    g.add_argument("--mock-itl", type=float, default=0.02)
    g = ap.add_argument_group("load")
    g.add_argument("--concurrency", default="1,64,256,512")
    g.add_argument("--prompts-per-stream", type=int, default=4)
    g.add_argument("--repeat", type=int, default=1,
                   help="runs per client and level, alternating ours and the peer's; medians are compared")
    g.add_argument("--input-len", type=int, default=128)
    g.add_argument("--output-len", type=int, default=128)
    g.add_argument("--range-ratio", type=float, default=0.0,
                   help="prompt and output lengths uniform in len x [1 - r, 1 + r], for both clients (vLLM's "
                        "--random-range-ratio): unequal lengths desynchronise closed-loop streams")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="sent by both clients (vllm bench serve sends none unless told: the server's default, 1.0)")
    g.add_argument("--workers", default="auto", help="our client's --workers")
    g.add_argument("--request-timeout", type=float, default=600)
    g.add_argument("--level-timeout", type=float, default=1800)
    g = ap.add_argument_group("peer")
    g.add_argument("--peer", choices=["auto", "vllm", "guidellm", "none"], default="auto")
    g.add_argument("--install-vllm-client", action=argparse.BooleanOptionalAction, default=True,
                   help=f"when vLLM is not importable, install its client (no deps) into {VLLM_CLIENT_DIR}")
    g.add_argument("--vllm-version", default="0.26.0")
    g.add_argument("--peer-pythonpath", default=os.environ.get("PAGEDSERVE_PEER_PYTHONPATH") or next(
        (p for p in ("/tmp/peer-site", str(ROOT.parent / "shared" / "peers" / "vllm")) if Path(p).is_dir()), None))
    g = ap.add_argument_group("self-check")
    g.add_argument("--self-check", action="store_true", help="only the mock-server client-ceiling check")
    g.add_argument("--self-check-streams", default="256,512")
    g.add_argument("--self-check-workers", default="auto")
    g.add_argument("--mock-processes", type=int, default=max(1, (os.cpu_count() or 2) // 4),
                   help="mock server processes (SO_REUSEPORT) so the mock is not the ceiling (default cores/4)")
    ap.add_argument("--out", default=str(RESULTS / "bench_agreement.json"))
    args = ap.parse_args()
    doc = {"args": vars(args), "host": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    if args.self_check:
        doc["self_check"] = self_check(args)
        if args.out == str(RESULTS / "bench_agreement.json"):
            args.out = str(RESULTS / "bench_agreement_selfcheck.json")
    else:
        def save_partial(partial: dict) -> None:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({**doc, "agreement": partial}, indent=1, default=str))

        doc["agreement"] = agreement(args, save_partial)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
