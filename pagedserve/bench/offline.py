"""Offline throughput: pagedserve's engine vs Hugging Face `generate` on the same workload, in the same run.

Three workload shapes (pick with --scenarios):

- fixed:          N prompts of --input-len tokens, --output-len new tokens each, at each of --batch-sizes
- longtail:       mixed prompt lengths and long-tailed output lengths (--longtail-*), where
                  continuous batching should shine: HF static batches run to the longest output in
                  the batch, pagedserve refills a finished sequence's slot at the next step
- shared-prefix:  one --prefix-len system prompt followed by different short questions;
                  pagedserve runs with prefix caching on and off

Every request uses greedy decoding with ignore_eos, so output lengths are exact and both engines
produce the same number of *useful* tokens; only those count in tok/s (an HF batch that runs past a
request's own length computes tokens nobody asked for). Prompts are random token ids (seeded).

`batch size` means concurrency: pagedserve's max_num_seqs, HF's static batch size.

KV memory efficiency = tokens whose K/V are stored / token capacity of the allocated KV memory,
sampled after every engine step and averaged over steps:
- paged:        stored tokens / (blocks in use x block_size); a block shared by several sequences
                (prefix cache) is counted once
- static:       the same engine's schedule had every running sequence reserved a contiguous slot
                of the workload's maximum length (prompt + output of its longest request) up front,
                as static pre-allocation must when output lengths are unknown
- hf (KV eff.): HF's padded batch KV cache: batch x (longest prompt + steps so far), of which only
                each request's own prompt and its useful outputs count as stored
KV peak tokens: the most token slots allocated at once during the run (paged blocks in use; HF's
padded cache), i.e. the KV memory the workload needed; prefix sharing shows up here.

Wall-clock tok/s is the headline; each result also records the process CPU time (`cpu_s`), which
moves far less than wall time when other processes share the cores.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

from pagedserve.model.default_model import DEFAULT_MODEL_NAME

SCENARIOS = ("fixed", "longtail", "shared-prefix")


# -- workloads ------------------------------------------------------------------

@dataclass
class Workload:
    scenario: str
    name: str
    prompts: list[list[int]]
    output_lens: list[int]
    batch_size: int
    description: str = ""
    engines: tuple[str, ...] = ("pagedserve",)  # which pagedserve variants run (plus hf with --compare-hf)

    @property
    def num_requests(self) -> int:
        return len(self.prompts)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)

    @property
    def max_len(self) -> int:
        return max(len(p) + o for p, o in zip(self.prompts, self.output_lens))

    def summary(self) -> dict:
        pl = [len(p) for p in self.prompts]
        return {
            "scenario": self.scenario, "name": self.name, "description": self.description,
            "num_requests": self.num_requests, "batch_size": self.batch_size,
            "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
            "prompt_len": {"min": min(pl), "mean": statistics.fmean(pl), "max": max(pl)},
            "output_len": {"min": min(self.output_lens), "mean": statistics.fmean(self.output_lens),
                           "max": max(self.output_lens)},
            "max_len": self.max_len,
        }


class _TokenSource:
    """Random ordinary token ids (no special tokens), reproducible from a seed."""

    def __init__(self, vocab_size: int, special_ids, seed: int):
        self.rng = random.Random(seed)
        self.vocab = vocab_size
        self.special = set(special_ids or ())

    def ids(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            t = self.rng.randrange(100, self.vocab)
            if t not in self.special:
                out.append(t)
        return out


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = str(text).partition("-")
    lo_i = int(lo)
    hi_i = int(hi) if hi else lo_i
    if lo_i < 1 or hi_i < lo_i:
        raise argparse.ArgumentTypeError(f"expected N or LO-HI with 1 <= LO <= HI, got {text!r}")
    return lo_i, hi_i


def longtail_lengths(n: int, lo: int, hi: int, rng: random.Random) -> list[int]:
    """Long-tailed output lengths in [lo, hi]: most requests short, a few near hi.

    Log-normal around ~2.5 x lo, clipped; the shortest and longest values are always present so
    every run exercises both ends.
    """
    if n == 1:
        return [hi]
    median = min(hi, max(lo, 2.5 * lo))
    out = [int(min(hi, max(lo, rng.lognormvariate(math.log(median), 0.9)))) for _ in range(n)]
    out[rng.randrange(n)] = hi
    i = rng.randrange(n)
    while out[i] == hi and n > 1:
        i = rng.randrange(n)
    out[i] = lo
    return out


def build_workloads(args, vocab_size: int, special_ids) -> list[Workload]:
    src = _TokenSource(vocab_size, special_ids, args.seed)
    rng = random.Random(args.seed + 1)
    wls: list[Workload] = []
    for scen in args.scenarios:
        if scen == "fixed":
            for b in args.batch_sizes:
                n = args.num_prompts or max(b, args.min_prompts)
                wls.append(Workload(
                    "fixed", f"(a) {args.input_len}+{args.output_len} b={b}",
                    [src.ids(args.input_len) for _ in range(n)], [args.output_len] * n, b,
                    f"{n} prompts of {args.input_len} tokens, {args.output_len} new tokens each"))
        elif scen == "longtail":
            n, b = args.longtail_num_prompts, args.longtail_batch_size
            plo, phi = args.longtail_input_len
            olo, ohi = args.longtail_output_len
            outs = longtail_lengths(n, olo, ohi, rng)
            wls.append(Workload(
                "longtail", f"(b) longtail {olo}-{ohi} b={b}",
                [src.ids(rng.randint(plo, phi)) for _ in range(n)], outs, b,
                f"{n} prompts of {plo}-{phi} tokens, long-tailed outputs {olo}-{ohi} tokens "
                f"(mean {statistics.fmean(outs):.0f})"))
        elif scen == "shared-prefix":
            n, b = args.prefix_num_prompts, args.prefix_batch_size
            qlo, qhi = args.prefix_question_len
            system = src.ids(args.prefix_len)
            wls.append(Workload(
                "shared-prefix", f"(c) prefix {args.prefix_len} b={b}",
                [system + src.ids(rng.randint(qlo, qhi)) for _ in range(n)], [args.prefix_output_len] * n, b,
                f"{n} prompts = one {args.prefix_len}-token system prompt + a {qlo}-{qhi}-token question, "
                f"{args.prefix_output_len} new tokens each",
                engines=("pagedserve", "pagedserve-no-prefix-cache")))
        else:
            raise ValueError(f"unknown scenario {scen!r}")
    return wls


# -- measurement ----------------------------------------------------------------------

@dataclass
class RunResult:
    engine: str
    output_tokens: int  # useful tokens: what the requests asked for
    computed_tokens: int  # tokens the engine generated, wasted ones included
    elapsed_s: float
    steps: int
    kv_efficiency: float | None = None  # mean over steps
    kv_efficiency_min: float | None = None
    kv_efficiency_static: float | None = None  # static pre-allocation to the workload's max length
    kv_peak_tokens: int | None = None  # most KV token slots allocated at once (memory actually needed)
    kv_peak_tokens_static: int | None = None  # the same, had every running sequence reserved max_len
    prefix_cache_hit_rate: float | None = None
    cpu_s: float | None = None  # CPU time of this process (all threads) during the run
    extra: dict = field(default_factory=dict)

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


def _set_max_num_seqs(llm, n: int) -> None:
    """One engine serves every batch size: concurrency is the scheduler's max_num_seqs."""
    llm.engine.config.max_num_seqs = n
    llm.engine.scheduler.max_num_seqs = n


def _kv_sample(engine, max_len: int) -> tuple[int, int, int, int]:
    """(stored, capacity) for paged blocks and for static max-length slots, right after a step.

    After a step every allocated block of a running sequence covers computed tokens only
    (the next step allocates before it computes), so this is the cache as it stands.
    """
    bm = engine.block_manager
    bs = bm.block_size
    filled: dict[int, int] = {}
    live = 0
    per_seq = 0
    for req in engine.scheduler.running:
        for seq in req.seqs:
            if seq.finished or not seq.block_table:
                continue
            live += 1
            nc = seq.num_computed
            per_seq += nc
            for i, bid in enumerate(seq.block_table):
                f = nc - i * bs
                if f <= 0:
                    break
                f = bs if f > bs else f
                if f > filled.get(bid, 0):
                    filled[bid] = f
    allocated = bm.num_blocks - bm.num_free_blocks
    return sum(filled.values()), allocated * bs, per_seq, live * max_len


def run_pagedserve(llm, wl: Workload, label: str) -> RunResult:
    from pagedserve.sampling_params import SamplingParams

    eng = llm.engine
    _set_max_num_seqs(llm, wl.batch_size)
    bm = eng.block_manager
    bm.reset_prefix_cache()
    q0, h0 = bm.prefix_queries, bm.prefix_hits
    max_len = wl.max_len
    effs: list[float] = []
    static: list[float] = []
    peak = peak_static = 0
    produced = 0
    steps = 0
    accounting = cpu_accounting = 0.0
    c0 = time.process_time()
    t0 = time.perf_counter()
    for i, (ids, n) in enumerate(zip(wl.prompts, wl.output_lens)):
        eng.add_request(f"bench-{i}", None, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                        prompt_token_ids=ids)
    while eng.has_unfinished_requests():
        outs = eng.step()
        steps += 1
        ta = time.perf_counter()
        ca = time.process_time()
        for o in outs:
            if o.finished:
                produced += len(o.outputs[0].token_ids)
        stored, cap, s_stored, s_cap = _kv_sample(eng, max_len)
        if cap:
            effs.append(stored / cap)
            peak = max(peak, cap)
        if s_cap:
            static.append(s_stored / s_cap)
            peak_static = max(peak_static, s_cap)
        accounting += time.perf_counter() - ta
        cpu_accounting += time.process_time() - ca
    elapsed = time.perf_counter() - t0 - accounting
    cpu = time.process_time() - c0 - cpu_accounting
    if produced != wl.output_tokens:
        raise RuntimeError(f"{label}: produced {produced} tokens, the workload asked for {wl.output_tokens}")
    if bm.num_free_blocks != bm.num_blocks:
        raise RuntimeError(f"{label}: {bm.num_blocks - bm.num_free_blocks} KV blocks still held after the run")
    q, h = bm.prefix_queries - q0, bm.prefix_hits - h0
    return RunResult(
        label, produced, produced, elapsed, steps,
        kv_efficiency=statistics.fmean(effs) if effs else None,
        kv_efficiency_min=min(effs) if effs else None,
        kv_efficiency_static=statistics.fmean(static) if static else None,
        kv_peak_tokens=peak, kv_peak_tokens_static=peak_static,
        prefix_cache_hit_rate=(h / q) if (bm.enable_prefix_caching and q) else None, cpu_s=cpu,
        extra={"accounting_s": accounting, "preemptions": eng.scheduler.num_preemptions},
    )


def run_hf(model, wl: Workload, pad_id: int) -> RunResult:
    """Static batches of wl.batch_size in arrival order, left-padded, each run to its longest output."""
    import torch
    from transformers import GenerationConfig

    produced = computed = steps = 0
    effs: list[float] = []
    static: list[float] = []
    peak = peak_static = 0
    max_len = wl.max_len
    c0 = time.process_time()
    t0 = time.perf_counter()
    for s in range(0, wl.num_requests, wl.batch_size):
        prompts = wl.prompts[s:s + wl.batch_size]
        outs = wl.output_lens[s:s + wl.batch_size]
        b, plen, new = len(prompts), max(len(p) for p in prompts), max(outs)
        ids = torch.full((b, plen), pad_id, dtype=torch.long)
        mask = torch.zeros((b, plen), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, plen - len(p):] = torch.tensor(p)
            mask[i, plen - len(p):] = 1
        gc_ = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                               pad_token_id=pad_id)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, generation_config=gc_)
        got = out.shape[1] - plen
        if got != new:
            raise RuntimeError(f"hf: batch generated {got} tokens, expected {new}")
        produced += sum(outs)
        computed += b * new
        steps += new
        lens = [len(p) for p in prompts]
        for t in range(1, new + 1):  # the cache after step t holds plen + t - 1 positions per row
            stored = sum(p + min(t - 1, o) for p, o in zip(lens, outs))
            effs.append(stored / (b * (plen + t - 1)))
            static.append(stored / (b * max_len))
        peak = max(peak, b * (plen + new - 1))
        peak_static = max(peak_static, b * max_len)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    return RunResult("hf", produced, computed, elapsed, steps,
                     kv_efficiency=statistics.fmean(effs), kv_efficiency_min=min(effs),
                     kv_efficiency_static=statistics.fmean(static), kv_peak_tokens=peak,
                     kv_peak_tokens_static=peak_static, cpu_s=cpu)


# -- engines --------------------------------------------------------------------------

class _Engines:
    """Loads each engine once and keeps it for every workload."""

    def __init__(self, args):
        self.args = args
        self._llms: dict[str, object] = {}
        self._hf = None

    def llm(self, label: str):
        if label not in self._llms:
            from pagedserve import LLM

            a = self.args
            llm = LLM(a.model, dtype=a.dtype, max_model_len=a.max_model_len, kv_cache_memory=a.kv_cache_memory,
                      block_size=a.block_size, max_num_batched_tokens=a.max_num_batched_tokens,
                      enable_prefix_caching=label != "pagedserve-no-prefix-cache", seed=a.seed)
            self._warm_pagedserve(llm)
            self._llms[label] = llm
        return self._llms[label]

    def _warm_pagedserve(self, llm) -> None:
        from pagedserve.sampling_params import SamplingParams

        src = _TokenSource(llm.engine.args.vocab_size, (), self.args.seed + 99)
        _set_max_num_seqs(llm, 4)
        llm.generate([src.ids(24 + 8 * i) for i in range(3)], SamplingParams(temperature=0, max_tokens=4,
                                                                               ignore_eos=True), use_tqdm=False)
        llm.engine.block_manager.reset_prefix_cache()

    def hf(self):
        if self._hf is None:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            path = self.model_path()
            model = AutoModelForCausalLM.from_pretrained(path, dtype=_torch_dtype(self.args.dtype)).eval()
            tok = AutoTokenizer.from_pretrained(path)
            pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
            ids = torch.randint(100, 1000, (2, 16))
            from transformers import GenerationConfig

            with torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=GenerationConfig(
                    max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=pad))
            self._hf = (model, pad)
        return self._hf

    def model_path(self) -> str:
        llm = next(iter(self._llms.values()), None)
        if llm is not None:
            return str(llm.engine.model_dir)
        from pagedserve.model.loader import resolve_model_dir

        return str(resolve_model_dir(self.args.model))

    def tokenizer_info(self) -> tuple[int, list[int]]:
        llm = self.llm("pagedserve")
        tok = llm.get_tokenizer()
        return llm.engine.args.vocab_size, list(getattr(tok, "all_special_ids", []) or [])


def _torch_dtype(name: str):
    import torch

    return {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
            "float16": torch.float16}[name]


# -- reporting --------------------------------------------------------------------------

def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def print_table(report: dict, file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Offline throughput ({report['meta']['model']}, {report['meta']['dtype']}, "
                        f"{report['meta']['device']}, {report['meta']['threads']} threads)")
    for col, just in [("scenario", "left"), ("engine", "left"), ("reqs", "right"), ("batch", "right"),
                      ("out tokens", "right"), ("time s", "right"), ("out tok/s", "right"), ("vs HF", "right"),
                      ("KV eff.", "right"), ("KV static", "right"), ("KV peak tok", "right"),
                      ("prefix hit", "right")]:
        table.add_column(col, justify=just)
    for sc in report["scenarios"]:
        w = sc["workload"]
        for label, r in sc["results"].items():
            ratio = sc["ratio_vs_hf"].get(label)
            table.add_row(w["name"], label, str(w["num_requests"]), str(w["batch_size"]), str(r["output_tokens"]),
                          f"{r['elapsed_s']:.2f}", f"{r['output_tok_s']:.1f}",
                          "-" if ratio is None else f"{ratio:.2f}x", _pct(r["kv_efficiency"]),
                          _pct(r["kv_efficiency_static"]), f"{r['kv_peak_tokens']:,}",
                          _pct(r["prefix_cache_hit_rate"]))
        table.add_section()
    Console(file=file, width=200).print(table)


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except Exception:
        return None


def _best(results: list[RunResult]) -> RunResult:
    """Fastest of the repeats (on a shared machine noise only ever slows a run down)."""
    best = max(results, key=lambda r: r.output_tok_s)
    best.extra["repeat_tok_s"] = [round(r.output_tok_s, 2) for r in results]
    return best


def _result_dict(r: RunResult) -> dict:
    d = asdict(r)
    d["output_tok_s"] = r.output_tok_s
    return d


# -- CLI ------------------------------------------------------------------------------------

def _int_list(text: str) -> list[int]:
    try:
        vals = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _scenarios(text: str) -> list[str]:
    vals = [x.strip() for x in str(text).split(",") if x.strip()]
    if vals == ["all"]:
        return list(SCENARIOS)
    bad = [v for v in vals if v not in SCENARIOS]
    if bad or not vals:
        raise argparse.ArgumentTypeError(f"scenarios must be 'all' or a comma list of {', '.join(SCENARIOS)}")
    return vals


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("workload")
    g.add_argument("--scenarios", type=_scenarios, default=["fixed"],
                   help=f"comma list of {', '.join(SCENARIOS)}, or 'all' (default: fixed)")
    g.add_argument("--input-len", type=int, default=128, help="fixed: prompt tokens (default 128)")
    g.add_argument("--output-len", type=int, default=64, help="fixed: new tokens per request (default 64)")
    g.add_argument("--batch-sizes", type=_int_list, default=[32],
                   help="fixed: comma list of concurrencies (default 32)")
    g.add_argument("--num-prompts", type=int, default=None,
                   help="fixed: requests per batch size (default: max(batch, --min-prompts))")
    g.add_argument("--min-prompts", type=int, default=4, help=argparse.SUPPRESS)
    g.add_argument("--longtail-num-prompts", type=int, default=64)
    g.add_argument("--longtail-batch-size", type=int, default=32)
    g.add_argument("--longtail-input-len", type=_range, default=(64, 192), help="LO-HI prompt tokens (64-192)")
    g.add_argument("--longtail-output-len", type=_range, default=(16, 256), help="LO-HI new tokens (16-256)")
    g.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: system prompt tokens (512)")
    g.add_argument("--prefix-num-prompts", type=int, default=32)
    g.add_argument("--prefix-batch-size", type=int, default=32)
    g.add_argument("--prefix-question-len", type=_range, default=(16, 48), help="LO-HI question tokens (16-48)")
    g.add_argument("--prefix-output-len", type=int, default=32)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--quick", action="store_true",
                   help="shrink every workload so the whole run takes seconds (smoke test, not a measurement)")
    e = parser.add_argument_group("engines")
    e.add_argument("--model", default=None, help=f"model dir or .gguf (default: the embedded {DEFAULT_MODEL_NAME})")
    e.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    e.add_argument("--max-model-len", type=int, default=None, help="default 2048 (quick: 512)")
    e.add_argument("--kv-cache-memory", type=float, default=None, help="GiB of KV cache (default 1.0; quick 0.1)")
    e.add_argument("--block-size", type=int, default=16)
    e.add_argument("--max-num-batched-tokens", type=int, default=None)
    e.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    e.add_argument("--compare-hf", action="store_true", help="also run Hugging Face generate on each workload")
    e.add_argument("--repeat", type=int, default=1, help="run each engine N times, interleaved; keep the fastest")
    o = parser.add_argument_group("output")
    o.add_argument("--out", default=None, help="write the JSON report here")


def apply_quick(args) -> None:
    """Tiny workloads, one thread (a smoke test that stays fast on a busy machine), one run each."""
    args.input_len, args.output_len = 16, 4
    args.batch_sizes = [1, 4]
    args.num_prompts, args.min_prompts = None, 1
    args.longtail_num_prompts, args.longtail_batch_size = 6, 3
    args.longtail_input_len, args.longtail_output_len = (8, 16), (2, 8)
    args.prefix_len, args.prefix_num_prompts, args.prefix_batch_size = 48, 4, 2
    args.prefix_question_len, args.prefix_output_len = (4, 8), 2
    if args.kv_cache_memory is None:
        args.kv_cache_memory = 0.05
    if args.threads is None:
        args.threads = 1
    args.repeat = 1


def run(args) -> int:
    import torch

    if args.quick:
        apply_quick(args)
    if args.kv_cache_memory is None:
        args.kv_cache_memory = 1.0
    if args.max_model_len is None:
        args.max_model_len = 512 if args.quick else 2048
    if args.threads:
        torch.set_num_threads(args.threads)
    engines = _Engines(args)
    # The pagedserve engine with prefix caching is always needed; load it first, it gives the vocabulary.
    vocab, special = engines.tokenizer_info()
    workloads = build_workloads(args, vocab, special)
    longest = max(w.max_len for w in workloads)
    meta = {
        "model": str(args.model or DEFAULT_MODEL_NAME), "dtype": args.dtype, "device": "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "cpus": os.cpu_count(), "git_commit": _git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "quick": bool(args.quick), "repeat": args.repeat,
        "kv_cache_memory_gib": args.kv_cache_memory, "block_size": args.block_size, "longest_request": longest,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    if longest > args.max_model_len:
        raise SystemExit(f"the longest request has {longest} tokens; raise --max-model-len")
    scenarios = []
    for wl in workloads:
        labels = list(wl.engines) + (["hf"] if args.compare_hf else [])
        runs: dict[str, list[RunResult]] = {lab: [] for lab in labels}
        for rep in range(args.repeat):
            for lab in labels:
                print(f"[bench] {wl.name}: {lab} (run {rep + 1}/{args.repeat})", file=sys.stderr, flush=True)
                gc.collect()
                if lab == "hf":
                    model, pad = engines.hf()
                    r = run_hf(model, wl, pad)
                else:
                    r = run_pagedserve(engines.llm(lab), wl, lab)
                print(f"[bench]   {r.output_tok_s:.1f} out tok/s ({r.elapsed_s:.2f}s wall, {r.cpu_s:.2f}s cpu)",
                      file=sys.stderr, flush=True)
                runs[lab].append(r)
        best = {lab: _best(rs) for lab, rs in runs.items()}
        ratios = {}
        if "hf" in best:
            hf_rate = best["hf"].output_tok_s
            ratios = {lab: r.output_tok_s / hf_rate for lab, r in best.items() if hf_rate > 0}
        scenarios.append({"workload": wl.summary(), "results": {lab: _result_dict(r) for lab, r in best.items()},
                          "ratio_vs_hf": ratios})
    report = {"meta": meta, "scenarios": scenarios}
    print_table(report)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
