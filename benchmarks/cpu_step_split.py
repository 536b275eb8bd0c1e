"""Where a CPU step's time goes, per workload of benchmarks/cpu_peer.py: attention (decode, shared-prefix
decode, prefill), GEMMs, other model ops, sampling + host bookkeeping.

    LD_PRELOAD=$VIRTUAL_ENV/lib/libiomp5.so KMP_BLOCKTIME=1 python benchmarks/cpu_step_split.py [b1 b32 prefix longtail]

Wraps the runner's and the attention backend's functions with wall-clock timers (the CPU path is
synchronous, so wall time per call is its cost) and prints each part's share of the generate()
call's wall time. NO_SHARED=1 turns the shared-prefix decode path off (A/B). Writes
benchmarks/results/cpu_step_split.json (or $SPLIT_OUT).
"""
import sys, time, random, os, collections, json
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import torch
from pagedserve import LLM, SamplingParams
from pagedserve.model.default_model import default_model_dir
import pagedserve.model.layers.attention as A, pagedserve.model.runner as R, pagedserve.engine.llm_engine as E
T = collections.Counter()
def timed(owner, name, key):
    """Wrap owner.name (a class's method or a module's function) with a timer adding to T[key]."""
    f = getattr(owner, name)
    def w(*a, **k):
        t = time.perf_counter()
        try: return f(*a, **k)
        finally: T[key] += time.perf_counter() - t
    setattr(owner, name, w)
timed(A.TorchAttentionBackend, "forward", "attention")
timed(R.OneDNNLinear, "forward", "gemm")
timed(R.ModelRunner, "prepare", "prepare")
timed(E, "build_input_batch", "build_batch")  # the engine's half of preparing a step (a module global)
timed(R.ModelRunner, "execute", "execute")
timed(E.LLMEngine, "step", "step")
if os.environ.get("NO_SHARED"):
    A.plan_shared = lambda *a, **k: None
timed(A, "shared_prefix_decode", "shared_decode")  # module functions the backend calls by name
timed(A, "paged_prefill_attention_ref", "prefill_attn")
timed(A, "paged_decode_attention_ref", "decode_attn")
llm = LLM(model=str(default_model_dir()), dtype="float32", max_model_len=1024)
rng = random.Random(0); V = 49152
def ids(n,l): return [[rng.randrange(2,V) for _ in range(l)] for _ in range(n)]
def mk(o): return SamplingParams(temperature=0, max_tokens=o, ignore_eos=True, detokenize=False)
llm.generate([{"prompt_token_ids":[5]*32}]*8,[mk(8)]*8, use_tqdm=False)
loads = {"b1": (ids(1,128),[64]), "b32": (ids(32,128),[64]*32),
         "longtail": (ids(32,128),[rng.randint(16,256) for _ in range(32)])}
pre = ids(1,512)[0]; loads["prefix"] = ([pre+s for s in ids(32,16)],[64]*32)
res = {}
for name in (sys.argv[1:] or loads):
    ps, outs = loads[name]
    T.clear(); t = time.perf_counter()
    out = llm.generate([{"prompt_token_ids":p} for p in ps],[mk(o) for o in outs], use_tqdm=False)
    wall = time.perf_counter() - t
    n = sum(len(r.outputs[0].token_ids) for r in out)
    model = T["execute"] - T["prepare"]
    row = {"tok_s": n/wall, "wall": wall, "attention": T["attention"], "gemm": T["gemm"],
           "other_model": model - T["attention"] - T["gemm"], "prepare": T["prepare"] + T["build_batch"], "shared_decode": T["shared_decode"], "prefill_attn": T["prefill_attn"], "decode_attn": T["decode_attn"],
           "sampling_and_host": T["step"] - T["execute"] - T["build_batch"], "outside_step": wall - T["step"]}
    res[name] = row
    print(name, f"{n/wall:.1f} tok/s wall {wall:.2f}s", " ".join(f"{k}={100*v/wall:.0f}%" for k, v in row.items() if k not in ("tok_s","wall")), flush=True)
    bm = llm.engine.block_manager; print("  prefix hits", bm.prefix_hits, "/", bm.prefix_queries, flush=True)
json.dump(res, open(os.environ.get("SPLIT_OUT", str(__import__("pathlib").Path(__file__).resolve().parent / "results" / "cpu_step_split.json")), "w"), indent=1)
