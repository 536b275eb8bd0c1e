"""pagedserve against vLLM on the same GPU, offline, in one run: the peer measured beside us.

    python benchmarks/peer_vllm.py                                   # 7B rows of the table below
    python benchmarks/peer_vllm.py --shapes 7b --configs bf16,fp8 --batches 1,256 --no-longtail --no-long
    python benchmarks/peer_vllm.py --configs bf16,bf16-sync          # + our step with overlap off (A/B)
    python benchmarks/peer_vllm.py --repeat 3                        # 3 passes, fresh prompts: medians
    python benchmarks/peer_vllm.py --served --streams 1,64,256       # both servers, both clients
    python benchmarks/peer_vllm.py --dry-run                         # CPU: tiny shape, pagedserve only
    python benchmarks/peer_vllm.py --dry-run --shapes tiny-moe       # CPU: a tiny Qwen3-MoE
    python benchmarks/peer_vllm.py --shapes qwen3-30b-a3b --configs fp8 --no-long        # MoE, H100
    python benchmarks/peer_vllm.py --shapes qwen1.5-moe-a2.7b --configs bf16 --no-long   # MoE (Qwen2-MoE)
    python benchmarks/peer_vllm.py --shapes qwen3-30b-a3b --configs bf16 --no-long       # MoE, H200 only
    python benchmarks/peer_vllm.py --qwen                            # Qwen-7B (QWenLMHeadModel) rows

vLLM must be importable (on the GPU machine: `../shared/peers/vllm/README.md`, then
PYTHONPATH=/tmp/peer-site and VLLM_USE_FLASHINFER_SAMPLER=0). Each (engine, shape, config)
runs in its own process, so one engine's memory and compiled state never touch the other's,
and the engines alternate per config.

Models: Qwen2.5-7B / 0.5B shapes with dummy bf16 weights and the vocab cut to SmolLM2's
49,152 (both engines load the same config.json). Mixture-of-experts shapes the same way:
Qwen3-30B-A3B (128 experts, top-8; 61 GB in bf16, so bf16 needs an H200; fp8 fits an H100) and
Qwen1.5-MoE-A2.7B (60 experts, top-4, a shared expert), from plan.KNOWN_MODELS. Prompts are token ids; greedy; ignore_eos.
Workloads (vLLM's names for the knobs):
- fixed: 128-token prompts, 128 new tokens, all requests at once, at each --batches size;
- long tail: 256 requests, outputs 50-500 tokens;
- long context: 4096-token prompts, 256 new tokens, at each --long-batches size.
--qwen: the Qwen-7B-Chat shape (QWenLMHeadModel: vocab 151,936, seq_length 8192, hidden 4096, 32
layers and heads, intermediate_size 22016) with dummy weights, both engines with trust_remote_code:
vLLM reads the config through the `configuration_qwen.py` this script writes into the checkpoint
(our own minimal PretrainedConfig, not Qwen's file) and skips its tokenizer (prompts are ids below
the tokenizer's 151,851); pagedserve builds its tokenizer from the real qwen.tiktoken. Rows: fixed
b=1/32/256, and 4K and 16K prompts at b=1 (past seq_length: vLLM lets the length through with
VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 but applies neither dynamic NTK nor logn there, pagedserve both).
Configs: bf16; fp8 (`quantization="fp8"`: weights fp8 per channel, dynamic per-token
activations); fp8kv (fp8 weights and `kv_cache_dtype="fp8"`).

Prints one table (tok/s per engine and pagedserve / vLLM) and writes peer_vllm.json to
--out (default $OUT, else ./out). One timed call per row swings by up to ~10% between engine
processes at batch 1 (stop 18: 183-208 tok/s for the same 4K-prompt row), so `--repeat N` runs
N whole passes over the rows with fresh prompts each (the same prompts for both engines) and
reports the median and the spread.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SHAPES = {"7b": "Qwen/Qwen2.5-7B-Instruct", "0.5b": "Qwen/Qwen2.5-0.5B-Instruct", "tiny": None, "tiny-moe": None,
          "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B", "qwen1.5-moe-a2.7b": "Qwen/Qwen1.5-MoE-A2.7B"}
# model_type -> architecture of the MoE shapes (gpu_throughput.make_model_dir writes dense Qwen2 configs)
MOE_ARCH = {"qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "mixtral": "MixtralForCausalLM"}
SHAPES.update({"qwen7b": None, "qwen-tiny": None})
QWEN_SHAPES = {  # QWenLMHeadModel config.json sizes (v1.1 keys)
    "qwen7b": dict(hidden_size=4096, kv_channels=128, num_attention_heads=32, num_hidden_layers=32,
                   intermediate_size=22016),
    "qwen-tiny": dict(hidden_size=128, kv_channels=32, num_attention_heads=4, num_hidden_layers=2,
                      intermediate_size=512),
}
QWEN_TOKENIZER_SIZE = 151_851  # prompts stay below it: the embedding's padded rows are no token
# configuration_qwen.py for the dummy checkpoint: what vLLM's trust_remote_code config loader needs
QWEN_CONFIG_PY = """from transformers import PretrainedConfig


class QWenConfig(PretrainedConfig):
    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=151936, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                 kv_channels=128, intermediate_size=22016, layer_norm_epsilon=1e-6, rotary_emb_base=10000,
                 rotary_pct=1.0, seq_length=8192, max_position_embeddings=32768, use_dynamic_ntk=True,
                 use_logn_attn=True, no_bias=True, tie_word_embeddings=False, **kwargs):
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.num_attention_heads, self.kv_channels, self.intermediate_size = (num_attention_heads, kv_channels,
                                                                              intermediate_size)
        self.layer_norm_epsilon, self.rotary_emb_base, self.rotary_pct = layer_norm_epsilon, rotary_emb_base, rotary_pct
        self.seq_length, self.max_position_embeddings = seq_length, max_position_embeddings
        self.use_dynamic_ntk, self.use_logn_attn, self.no_bias = use_dynamic_ntk, use_logn_attn, no_bias
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
"""


def qwen_model_dir(shape: str) -> Path:
    """A dummy QWen checkpoint: config.json, our configuration_qwen.py and the real qwen.tiktoken."""
    import shutil
    import tempfile

    from pagedserve.model.qwen_tokenizer import packaged_tiktoken

    d = Path(tempfile.mkdtemp(prefix=f"{shape}-"))
    cfg = {"architectures": ["QWenLMHeadModel"], "model_type": "qwen",
           "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig"}, "vocab_size": 151936,
           "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000, "rotary_pct": 1.0, "seq_length": 8192,
           "max_position_embeddings": 32768, "use_dynamic_ntk": True, "use_logn_attn": True, "no_bias": True,
           "tie_word_embeddings": False, "torch_dtype": "bfloat16", "eos_token_id": 151643,
           **QWEN_SHAPES[shape]}
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    (d / "configuration_qwen.py").write_text(QWEN_CONFIG_PY)
    shutil.copy(packaged_tiktoken(), d / "qwen.tiktoken")
    return d
CONFIGS = {"bf16": {}, "fp8": {"quantization": "fp8"}, "fp8kv": {"quantization": "fp8", "kv_cache_dtype": "fp8"}}
# pagedserve alone, with the overlapped step off: the A/B for issue 18 (compared with vLLM's bf16 row).
CONFIGS["bf16-sync"] = {"async_scheduling": False}


def model_dir(shape: str, tokenizer_dir: str | None = None) -> Path:
    """The shape's config.json with the default model's tokenizer and vocab (49,152)."""
    import shutil

    from transformers import AutoTokenizer

    if tokenizer_dir is None:
        from pagedserve.model.default_model import default_model_dir

        tokenizer_dir = str(default_model_dir())
    tok_dir = Path(tokenizer_dir)
    if shape in QWEN_SHAPES:
        return qwen_model_dir(shape)
    if shape in ("tiny", "tiny-moe"):
        import tempfile

        d = Path(tempfile.mkdtemp(prefix="shape-"))
        cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 128,
               "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
               "rope_theta": 1e6, "torch_dtype": "bfloat16", "tie_word_embeddings": False}
        if shape == "tiny-moe":  # 8 experts of 64, top-2: the MoE path end to end on the CPU
            cfg.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", head_dim=32, num_experts=8,
                       num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True)
    else:
        from gpu_throughput import make_model_dir

        from pagedserve.plan.model_shapes import KNOWN_MODELS

        d = make_model_dir(SHAPES[shape])
        cfg = json.loads((d / "config.json").read_text())
        kind = KNOWN_MODELS[SHAPES[shape]].get("model_type")
        if kind in MOE_ARCH:
            cfg.update(model_type=kind, architectures=[MOE_ARCH[kind]])
    for f in tok_dir.glob("tokenizer*"):
        shutil.copy(f, d / f.name)
    for f in ("special_tokens_map.json",):
        if (tok_dir / f).exists():
            shutil.copy(tok_dir / f, d / f)
    tok = AutoTokenizer.from_pretrained(d)
    cfg.update(vocab_size=len(tok), eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id or 1)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def workloads(args, vocab: int, rep: int = 0) -> list[tuple[str, list[list[int]], list[int]]]:
    """The offline rows. Each repeat draws fresh prompts (no prefix-cache hits across repeats); both
    engines draw the same ones (the seed is the repeat's index)."""
    import random

    rng = random.Random(rep)

    def ids(n: int, length: int) -> list[list[int]]:
        return [[rng.randrange(2, vocab) for _ in range(length)] for _ in range(n)]

    out = [(f"fixed b={b}", ids(b, args.prompt_len), [args.output_len] * b) for b in args.batches]
    if args.longtail:
        out.append((f"longtail n={args.longtail}", ids(args.longtail, args.prompt_len),
                    [rng.randint(50, 500) for _ in range(args.longtail)]))
    for n in args.long_prompt_lens:
        name = f"ctx{n // 1024}k" if n >= 1024 else f"ctx{n}"
        for b in args.long_batches:
            out.append((f"{name} b={b}", ids(b, n), [args.long_output_len] * b))
    return out


# -- one engine in this process ------------------------------------------------------------
def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def worker(engine: str, mdir: str, config: str, args) -> dict:
    cfg = CONFIGS[config]
    max_len = max([n + args.long_output_len for n in args.long_prompt_lens] + [args.prompt_len + 500]) + 64
    hf = json.loads(Path(mdir, "config.json").read_text())
    qwen = hf.get("model_type") == "qwen"
    vocab = min(hf["vocab_size"], QWEN_TOKENIZER_SIZE) if qwen else hf["vocab_size"]
    t_start = time.perf_counter()
    if engine == "pagedserve":
        from pagedserve import LLM, SamplingParams

        kw = dict(model=mdir, load_format="dummy", dtype=args.dtype, max_model_len=max_len, max_num_seqs=512,
                  trust_remote_code=qwen)
        if not args.dry_run:
            kw["gpu_memory_utilization"] = args.gpu_memory_utilization
        llm = LLM(**kw, **cfg)
        info = {"num_kv_blocks": llm.engine.num_kv_blocks, "block_size": llm.engine.config.block_size}
    else:
        if qwen:  # past seq_length (8192): vLLM refuses the length unless told to allow it
            os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
        from vllm import LLM, SamplingParams

        extra = dict(trust_remote_code=True, skip_tokenizer_init=True) if qwen else {}
        llm = LLM(model=mdir, load_format="dummy", dtype=args.dtype, max_model_len=max_len, max_num_seqs=512,
                  gpu_memory_utilization=args.gpu_memory_utilization, seed=0, **cfg, **extra)
        info = {}
        try:
            cc = llm.llm_engine.vllm_config.cache_config
            info = {"num_kv_blocks": cc.num_gpu_blocks, "block_size": cc.block_size}
        except Exception:  # the attribute moved between versions: the number is informative only
            pass
    info["startup_s"] = time.perf_counter() - t_start

    def make(o: int):  # both engines' SamplingParams take these names
        return SamplingParams(temperature=0, max_tokens=o, ignore_eos=True, detokenize=False)

    def prompts_of(ps: list[list[int]]) -> list[dict]:
        return [{"prompt_token_ids": p} for p in ps]

    def count(res) -> int:
        return sum(len(r.outputs[0].token_ids) for r in res)

    llm.generate(prompts_of([[5] * 32] * 8), [make(8)] * 8, use_tqdm=False)  # warm-up
    rows: dict[str, dict] = {}
    for rep in range(args.repeat):  # whole passes, so a slow stretch of the machine hits every row alike
        for name, prompts, outs in workloads(args, vocab, rep):
            _sync()
            t0 = time.perf_counter()
            res = llm.generate(prompts_of(prompts), [make(o) for o in outs], use_tqdm=False)
            _sync()
            dt = time.perf_counter() - t0
            got = count(res)
            row = rows.setdefault(name, {"workload": name, "output_tokens": got, "expected_tokens": sum(outs),
                                         "runs_tok_s": []})
            row["runs_tok_s"].append(got / dt)
            print(f"  {engine}/{config} {name} (run {rep + 1}/{args.repeat}): {got / dt:,.0f} tok/s",
                  file=sys.stderr, flush=True)
    for row in rows.values():  # the median of the runs, and their spread (max / min - 1)
        runs = row["runs_tok_s"]
        row["tok_s"] = statistics.median(runs)
        row["spread"] = max(runs) / min(runs) - 1
    rows = list(rows.values())
    return {"engine": engine, "config": config, "info": info, "rows": rows}


# -- the parent: alternate engines, one process each -------------------------------------------
def run_bounded(cmd: list[str], timeout: float, **popen_kw) -> tuple[int, str | None]:
    """Run cmd in its own process group; past `timeout`, SIGTERM the group (our scripts then stop the
    servers they started), SIGKILL it 60 s later, and raise TimeoutExpired. subprocess.run's own
    timeout SIGKILLs the child alone, and its children (a vLLM engine core, a server in its own
    session) can live on holding the GPU: in stop 18 the next vLLM server of the run exited before
    it was ready."""
    p = subprocess.Popen(cmd, start_new_session=True, **popen_kw)
    try:
        out, _ = p.communicate(timeout=timeout)
        return p.returncode, out
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
            try:
                p.communicate(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        raise


def run_child(engine: str, mdir: Path, shape: str, config: str, argv: list[str], timeout: float) -> dict:
    cmd = [sys.executable, __file__, *argv, "--worker", engine, "--model-dir", str(mdir), "--config", config]
    print("$", " ".join(cmd[-6:]), flush=True)
    try:
        code, out = run_bounded(cmd, timeout, stdout=subprocess.PIPE, stderr=None, text=True)
    except subprocess.TimeoutExpired:
        return {"engine": engine, "config": config, "shape": shape, "error": f"timed out after {timeout:.0f} s"}
    line = next((ln for ln in reversed(out.splitlines()) if ln.startswith("RESULT ")), None)
    if code != 0 or line is None:
        return {"engine": engine, "config": config, "shape": shape, "error": f"exit {code}"}
    res = json.loads(line[len("RESULT "):])
    res["shape"] = shape
    return res


def table(results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        if r["engine"] != "pagedserve" or "rows" not in r:
            continue
        peer = next((v for v in results if v["engine"] == "vllm" and v["config"] == r["config"].removesuffix("-sync")
                     and v["shape"] == r["shape"] and "rows" in v), None)
        for row in r["rows"]:
            vrow = next((v for v in (peer or {}).get("rows", []) if v["workload"] == row["workload"]), None)
            rows.append({"shape": r["shape"], "config": r["config"], "workload": row["workload"],
                         "pagedserve_tok_s": row["tok_s"], "vllm_tok_s": vrow["tok_s"] if vrow else None,
                         "ratio": row["tok_s"] / vrow["tok_s"] if vrow else None,
                         "spread": [row.get("spread"), vrow.get("spread") if vrow else None]})
    return rows


def served(args, out_dir: Path) -> int:
    """Each server (pagedserve, vLLM) on the 7B shape, measured by both clients through bench_agreement.py."""
    shape = SHAPES[args.shapes.split(",")[0]]
    tok = ["--tokenizer", args.tokenizer_dir] if args.tokenizer_dir else []
    peer_path = next((p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if "peer" in p), "")
    report = {}
    for server, flag in (("pagedserve", "--pagedserve-dummy"), ("vllm", "--vllm-dummy")):
        out = out_dir / f"served_{server}.json"
        if server not in args.servers.split(","):  # measured earlier (e.g. in another call on the GPU machine)
            try:
                report[server] = json.loads(out.read_text())["agreement"]["levels"]
            except (OSError, ValueError, KeyError) as e:
                report[server] = {"error": f"not run and no {out.name}: {e}"}
            continue
        cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_agreement.py"), flag, shape, *tok, "--peer", "vllm",
               "--concurrency", args.streams, "--repeat", str(args.repeat), "--input-len", str(args.prompt_len),
               "--output-len",
               str(args.output_len), "--out", str(out), *(["--peer-pythonpath", peer_path] if peer_path else [])]
        print("$", " ".join(cmd), flush=True)
        try:
            run_bounded(cmd, args.timeout)
            report[server] = json.loads(out.read_text())["agreement"]["levels"]
        except (subprocess.TimeoutExpired, OSError, ValueError, KeyError) as e:
            report[server] = {"error": f"{type(e).__name__}: {e}"}
    rows = []
    ok = all(isinstance(v, list) for v in report.values())
    for lv in report["pagedserve"] if ok else []:
        v = next((x for x in report["vllm"] if x["concurrency"] == lv["concurrency"]), None)
        if v is None:
            continue
        for client in ("ours", "peer"):
            a, b = lv[client], v[client]
            rows.append({"streams": lv["concurrency"], "client": "pagedserve bench" if client == "ours" else
                         "vllm bench serve", "pagedserve_tok_s": a["output_throughput"],
                         "vllm_tok_s": b["output_throughput"], "ratio": a["output_throughput"] / b["output_throughput"],
                         "ttft_p50_ms": [a["ttft_p50_ms"], b["ttft_p50_ms"]], "tpot_p50_ms": [a["tpot_p50_ms"],
                                                                                           b["tpot_p50_ms"]]})
    (out_dir / "peer_vllm_served.json").write_text(json.dumps({"levels": report, "table": rows}, indent=1))
    print(f"\n{'streams':>7} {'client':<17} {'pagedserve':>10} {'vLLM':>9} {'ratio':>6} {'TTFT P50 ms':>15} "
          f"{'TPOT P50 ms':>13}")
    for r in rows:
        print(f"{r['streams']:>7} {r['client']:<17} {r['pagedserve_tok_s']:>10,.0f} {r['vllm_tok_s']:>9,.0f} "
              f"{r['ratio']:>6.2f} {r['ttft_p50_ms'][0]:>7.0f}/{r['ttft_p50_ms'][1]:<7.0f} "
              f"{r['tpot_p50_ms'][0]:>6.1f}/{r['tpot_p50_ms'][1]:<6.1f}")
    for k, v in report.items():
        if not isinstance(v, list):
            print(f"{k}: {v['error']}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="7b")
    ap.add_argument("--configs", default="bf16")
    ap.add_argument("--engines", default="pagedserve,vllm")
    ap.add_argument("--batches", default="1,32,256,512")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--longtail", type=int, default=256)
    ap.add_argument("--no-longtail", action="store_true")
    ap.add_argument("--long-batches", default="1,16,64")
    ap.add_argument("--no-long", action="store_true")
    ap.add_argument("--long-prompt-lens", default="4096", help="long-context prompt lengths, comma-separated")
    ap.add_argument("--long-output-len", type=int, default=256)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--tokenizer-dir", default=None, help="tokenizer files (default: the embedded model's)")
    ap.add_argument("--timeout", type=float, default=480, help="seconds per engine process")
    ap.add_argument("--dry-run", action="store_true", help="CPU: tiny shape, small loads, pagedserve only")
    ap.add_argument("--served", action="store_true",
                    help="instead: both servers (7B shape), each measured by our client and `vllm bench serve`")
    ap.add_argument("--streams", default="1,64,256", help="--served concurrency levels")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per row, fresh prompts each (offline) or per client and level (--served); medians")
    ap.add_argument("--servers", default="pagedserve,vllm",
                    help="--served: servers to run now; the others' served_<name>.json are read from --out")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--qwen", action="store_true",
                    help="the Qwen-7B-Chat rows: --shapes qwen7b --batches 1,32,256 --no-longtail "
                         "--long-prompt-lens 4096,16384 --long-batches 1")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args()
    parent_argv = [a for a in sys.argv[1:]]
    if args.qwen:
        args.shapes, args.batches, args.long_batches = "qwen7b", "1,32,256", "1"
        args.longtail, args.long_prompt_lens = 0, "4096,16384"
    if args.dry_run:
        args.engines, args.batches, args.long_batches = "pagedserve", "1,4", "1"
        args.shapes = "qwen-tiny" if args.qwen else args.shapes if args.shapes in ("tiny", "tiny-moe") else "tiny"
        args.prompt_len, args.output_len, args.longtail = 16, 8, 4
        args.long_prompt_lens, args.long_output_len = "64", 4
    args.batches = [int(b) for b in str(args.batches).split(",") if b]
    args.long_prompt_lens = [int(n) for n in str(args.long_prompt_lens).split(",") if n]
    args.long_batches = [] if args.no_long else [int(b) for b in str(args.long_batches).split(",") if b]
    if args.no_longtail:
        args.longtail = 0
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.model_dir, args.config, args)), flush=True)
        return 0

    out_dir = Path(args.out or os.environ.get("OUT") or ROOT / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.served:
        return served(args, out_dir)
    results = []
    for shape in args.shapes.split(","):
        mdir = model_dir(shape, args.tokenizer_dir)
        for config in args.configs.split(","):
            for engine in args.engines.split(","):
                if engine == "vllm" and config.endswith("-sync"):
                    continue  # an A/B of our own step; vLLM's row is its default
                results.append(run_child(engine, mdir, shape, config, parent_argv, args.timeout))
                (out_dir / "peer_vllm.json").write_text(json.dumps({"results": results}, indent=1))
    rows = table(results)
    report = {"results": results, "table": rows}
    try:
        import torch

        report["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception:
        pass
    (out_dir / "peer_vllm.json").write_text(json.dumps(report, indent=1))
    print(f"\n{'shape':<5} {'config':<9} {'workload':<16} {'pagedserve':>11} {'vLLM':>9} {'ratio':>6}"
          + (f" {'spread (ours / vLLM)':>21}" if args.repeat > 1 else ""))
    for r in rows:
        v = f"{r['vllm_tok_s']:,.0f}" if r["vllm_tok_s"] else "-"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] else "-"
        spread = " ".join("-" if x is None else f"{x:.1%}" for x in r["spread"])
        print(f"{r['shape']:<5} {r['config']:<9} {r['workload']:<16} {r['pagedserve_tok_s']:>11,.0f} {v:>9} {ratio:>6}"
              + (f" {spread:>21}" if args.repeat > 1 else ""))
    for r in results:
        if "error" in r:
            print(f"{r['shape']} {r['config']} {r['engine']}: {r['error']}")
        elif "info" in r:
            print(f"{r['shape']} {r['config']} {r['engine']}: {r['info']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
