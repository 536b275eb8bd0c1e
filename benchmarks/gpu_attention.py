"""Triton paged attention on a GPU: correctness at real shapes, decode speed vs the torch
reference and vs the memory-bandwidth bound.

    python benchmarks/gpu_attention.py            # on CUDA (Qwen2.5-7B attention shape)
    python benchmarks/gpu_attention.py --smoke    # CPU, Triton interpreter, tiny shapes

Shape: 28 query heads / 4 KV heads, head_dim 128, bf16, block_size 16, block
tables shuffled over the whole pool. For every (batch, context) the decode
kernel is checked against `paged_decode_attention_ref`, then timed:
  * triton: the backend's call (heuristic split count), L2 flushed between reps;
  * graph: the same call replayed from a CUDA graph (no launch overhead);
  * ref: the torch reference;
  * sweep: every split count in --splits, the best one reported;
  * bound: KV bytes read / D2D copy bandwidth measured in the same run.
Prefill (whole prompts, and a chunk after a cached prefix) and a mixed batch
through `TritonAttentionBackend.forward` are checked and timed too.

Prints tables; writes JSON to $OUT/gpu_attention.json (else ./out/). Exits 1 if a check failed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

SMOKE = "--smoke" in sys.argv
if SMOKE:  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402

from pagedserve.model.kernels import triton_attention as TA  # noqa: E402
from pagedserve.model.attention_metadata import AttentionMetadata  # noqa: E402
from pagedserve.model.layers.attention import (  # noqa: E402
    TorchAttentionBackend,
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
)

TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 2e-4}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny shapes")
    ap.add_argument("--heads", type=int, default=28)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--batches", default="1,8,32,64,128,256")
    ap.add_argument("--contexts", default="128,512,1024,2048,4096")
    ap.add_argument("--splits", default="1,2,4,8,16,32,64", help="split counts swept per point ('' to skip)")
    ap.add_argument("--no-ref-timing", action="store_true", help="skip timing the torch reference")
    ap.add_argument("--rep-ms", type=float, default=40.0, help="timing budget per measurement")
    ap.add_argument("--tune", action="store_true", help="also sweep tile sizes / warps / stages")
    ap.add_argument("--skip-main", action="store_true", help="with --tune: only the sweep")
    ap.add_argument("--out", default=None, help="output folder (default $OUT or ./out)")
    a = ap.parse_args()
    if a.smoke:
        a.batches, a.contexts, a.splits = "1,3", "16,40", "1,3"
        a.heads, a.kv_heads = 14, 2  # Qwen2.5-7B's group of 7, fewer heads for the interpreter
        a.rep_ms = 1.0
    return a


# ------------------------------------------------------------------ timing
def bench_ms(fn, rep_ms: float, cuda: bool, flush_l2: bool = True) -> float:
    """Median milliseconds per call."""
    if cuda:
        fn()
        torch.cuda.synchronize()
        if flush_l2:
            try:
                return float(triton.testing.do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms,
                                                     return_mode="median"))
            except TypeError:  # older signature
                return float(triton.testing.do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(max(5, int(rep_ms))):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    fn()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def bench_graph_ms(fn, rep_ms: float, cuda: bool) -> float | None:
    """Median ms per call replayed from a CUDA graph (the call's own launch overhead removed)."""
    if not cuda:
        return None
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    n_inner = 20
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n_inner):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3 * 2
    while len(times) < 5 or time.perf_counter() < deadline:
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / n_inner)
        if len(times) > 200:
            break
    return statistics.median(times)


def host_us(fn, n: int = 100) -> float:
    """Microseconds of host time per call when calls are only enqueued (no sync between them)."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    dt = time.perf_counter() - t
    torch.cuda.synchronize()
    return dt / n * 1e6


def measure_copy_bandwidth(device: torch.device, cuda: bool, rep_ms: float) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    n = (1 << 30) if cuda else (1 << 22)
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = bench_ms(lambda: y.copy_(x), max(rep_ms, 50.0) if cuda else rep_ms, cuda, flush_l2=False)
    del x, y
    return 2 * n / (ms / 1e3)


# ------------------------------------------------------------------ data
class Pool:
    """One layer's KV cache big enough for the largest point, filled with random values."""

    def __init__(self, num_blocks, block_size, kvh, d, dtype, device, seed=0):
        g = torch.Generator(device=device).manual_seed(seed)
        shape = (num_blocks, block_size, kvh, d)
        self.k = torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)
        self.v = torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.device = device

    def tables(self, lens, seed):
        """Shuffled distinct blocks for each sequence (block 0 stays the padding value)."""
        bs = self.block_size
        need = [(n + bs - 1) // bs for n in lens]
        assert sum(need) <= self.num_blocks - 1, "pool too small"
        g = torch.Generator().manual_seed(seed)
        perm = (torch.randperm(self.num_blocks - 1, generator=g) + 1).to(torch.int32)
        width = max(need)
        bt = torch.zeros(len(lens), width, dtype=torch.int32)
        i = 0
        for r, n in enumerate(need):
            bt[r, :n] = perm[i:i + n]
            i += n
        return bt.to(self.device)


def max_err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def fmt_table(rows, cols):
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(cols, widths)))
    return "\n".join(lines)


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0 or abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)


# ------------------------------------------------------------------ sections
def run_decode(a, pool, dtype, device, cuda, bw, failures):
    h, kvh, d = a.heads, a.kv_heads, a.head_dim
    batches = [int(x) for x in a.batches.split(",") if x]
    contexts = [int(x) for x in a.contexts.split(",") if x]
    splits_sweep = [int(x) for x in a.splits.split(",") if x]
    scale = d ** -0.5
    elt = torch.tensor([], dtype=dtype).element_size()
    rows = []
    for b in batches:
        for ctx in contexts:
            row = {"batch": b, "ctx": ctx}
            try:
                # Lengths spread over [ctx/2, ctx], one sequence exactly ctx (max_seq_len = ctx).
                g = torch.Generator().manual_seed(b * 7919 + ctx)
                lens_l = torch.randint(max(1, ctx // 2), ctx + 1, (b,), generator=g).tolist()
                lens_l[0] = ctx
                lens = torch.tensor(lens_l, dtype=torch.int32, device=device)
                bt = pool.tables(lens_l, seed=b * 31 + ctx)
                q = torch.randn(b, h, d, device=device, dtype=torch.float32).to(dtype)
                kv_bytes = sum(lens_l) * kvh * d * elt * 2
                splits = TA.choose_num_splits(b, kvh, ctx, device)
                row.update(splits=splits, kv_MB=kv_bytes / 1e6)

                def tri(ns=None):
                    return TA.paged_decode_attention_triton(q, pool.k, pool.v, bt, lens, scale, ctx, num_splits=ns)

                ref = paged_decode_attention_ref(q, pool.k, pool.v, bt, lens, scale, ctx)
                err = max_err(tri(), ref)
                err_split = max(max_err(tri(ns), ref) for ns in sorted({1, 7, splits}))
                row["max_err"] = max(err, err_split)
                if not row["max_err"] <= TOL[dtype]:
                    failures.append(f"decode b={b} ctx={ctx}: max error {row['max_err']:.3g} > {TOL[dtype]}")
                del ref

                if cuda:  # host time to enqueue one call (Python + launch), GPU kept busy by the queue
                    row["host_us"] = host_us(lambda: tri())
                t_tri = bench_ms(lambda: tri(), a.rep_ms, cuda)
                row["triton_us"] = t_tri * 1e3
                try:
                    tg = bench_graph_ms(lambda: tri(), a.rep_ms, cuda)
                    row["graph_us"] = None if tg is None else tg * 1e3
                except Exception as e:  # graph capture is a nice-to-have here
                    row["graph_us"] = None
                    row["graph_error"] = repr(e)
                if not a.no_ref_timing:
                    t_ref = bench_ms(lambda: paged_decode_attention_ref(q, pool.k, pool.v, bt, lens, scale, ctx),
                                     a.rep_ms, cuda)
                    row["ref_us"] = t_ref * 1e3
                    row["speedup"] = t_ref / t_tri
                best = None
                for ns in splits_sweep:  # from a CUDA graph: the kernels' time, not Python's launch cost
                    t = bench_graph_ms(lambda: tri(ns), a.rep_ms, cuda) if cuda else bench_ms(lambda: tri(ns), a.rep_ms, cuda)
                    row[f"s{ns}_us"] = t * 1e3
                    if best is None or t < best[1]:
                        best = (ns, t)
                if best:
                    row["best_splits"], row["best_us"] = best[0], best[1] * 1e3
                bound_us = kv_bytes / bw * 1e6
                row["bound_us"] = bound_us
                row["pct_bound"] = 100 * bound_us / row["triton_us"]
                if row.get("graph_us"):
                    row["pct_bound_graph"] = 100 * bound_us / row["graph_us"]
                row["GBps"] = kv_bytes / (row["triton_us"] / 1e6) / 1e9
                del q, bt, lens
            except Exception as e:
                traceback.print_exc()
                row["error"] = repr(e)
                failures.append(f"decode b={b} ctx={ctx}: {e!r}")
            rows.append(row)
            print(f"  decode b={b:>4} ctx={ctx:>5}: " + ", ".join(
                f"{k}={_fmt(v)}" for k, v in row.items() if k not in ("batch", "ctx") and not k.startswith("s")
                or k == "splits"), flush=True)
    return rows


def prefill_cases(smoke):
    # (name, [(prefix_len, chunk_len), ...])
    if smoke:
        return [("prompts", [(0, 20), (0, 7)]), ("chunk+prefix", [(33, 12)])]
    return [
        ("1x2048 prompt", [(0, 2048)]),
        ("4x1024 prompts", [(0, 1024)] * 4),
        ("16x512 prompts", [(0, 512)] * 16),
        ("64x128 prompts", [(0, 128)] * 64),
        ("chunk 512 after 3584", [(3584, 512)]),
        ("8x chunk 256 after 1024", [(1024, 256)] * 8),
    ]


def run_prefill(a, pool, dtype, device, cuda, failures):
    h, kvh, d = a.heads, a.kv_heads, a.head_dim
    scale = d ** -0.5
    rows = []
    for name, spec in prefill_cases(a.smoke):
        row = {"case": name}
        try:
            ctx = [p + c for p, c in spec]
            qs = [0]
            for _, c in spec:
                qs.append(qs[-1] + c)
            bt = pool.tables(ctx, seed=len(spec) * 101 + ctx[0])
            q = torch.randn(qs[-1], h, d, device=device, dtype=torch.float32).to(dtype)
            qs_t = torch.tensor(qs, dtype=torch.int32, device=device)
            ctx_t = torch.tensor(ctx, dtype=torch.int32, device=device)
            max_q = max(c for _, c in spec)

            def tri():
                return TA.paged_prefill_attention_triton(q, pool.k, pool.v, bt, qs_t, ctx_t, max_q, scale)

            ref = paged_prefill_attention_ref(q, pool.k, pool.v, bt, qs, ctx, scale)
            row["max_err"] = max_err(tri(), ref)
            if not row["max_err"] <= TOL[dtype]:
                failures.append(f"prefill {name}: max error {row['max_err']:.3g} > {TOL[dtype]}")
            del ref
            flops = sum(4 * h * d * (c * p + c * (c + 1) / 2) for p, c in spec)
            t = bench_ms(tri, a.rep_ms, cuda)
            row.update(tokens=qs[-1], triton_us=t * 1e3, TFLOPs=flops / (t / 1e3) / 1e12)
            if not a.no_ref_timing:
                tr = bench_ms(lambda: paged_prefill_attention_ref(q, pool.k, pool.v, bt, qs, ctx, scale),
                              a.rep_ms, cuda)
                row.update(ref_us=tr * 1e3, speedup=tr / t)
        except Exception as e:
            traceback.print_exc()
            row["error"] = repr(e)
            failures.append(f"prefill {name}: {e!r}")
        rows.append(row)
        print(f"  prefill {name}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k != "case"), flush=True)
    return rows


def run_mixed(a, dtype, device, cuda, failures):
    """decodes + prefill chunks through the backends' forward (KV write included), fresh caches."""
    h, kvh, d, bs = a.heads, a.kv_heads, a.head_dim, a.block_size
    if a.smoke:
        decode_ctx, prefill_spec = [1, 16, 29], [(0, 9), (20, 6)]
    else:
        decode_ctx = [1, 16, 17, 100, 1000, 4000] + [int(x) for x in torch.randint(1, 2048, (58,)).tolist()]
        prefill_spec = [(0, 300), (2000, 512), (17, 1)]
    nd = len(decode_ctx)
    all_ctx = decode_ctx + [p + c for p, c in prefill_spec]
    nb = sum((c + bs - 1) // bs for c in all_ctx) + 8
    pool = Pool(nb, bs, kvh, d, dtype, device, seed=5)
    bt_all = pool.tables(all_ctx, seed=77)
    bt_host = bt_all.tolist()
    slots = []
    for i, c in enumerate(all_ctx):
        n = 1 if i < nd else prefill_spec[i - nd][1]
        slots.extend(bt_host[i][p // bs] * bs + p % bs for p in range(c - n, c))
    qs = [0]
    for _, c in prefill_spec:
        qs.append(qs[-1] + c)
    i32 = dict(dtype=torch.int32, device=device)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        num_decode=nd,
        decode_block_tables=bt_all[:nd].contiguous(),
        decode_seq_lens=torch.tensor(decode_ctx, **i32),
        prefill_query_start=torch.tensor(qs, **i32),
        prefill_seq_lens=torch.tensor([p + c for p, c in prefill_spec], **i32),
        prefill_block_tables=bt_all[nd:].contiguous(),
        decode_max_seq_len=max(decode_ctx),
        prefill_query_start_list=tuple(qs),
        prefill_seq_lens_list=tuple(p + c for p, c in prefill_spec),
    )
    t = len(slots)
    q = torch.randn(t, h, d, device=device).to(dtype)
    k = torch.randn(t, kvh, d, device=device).to(dtype)
    v = torch.randn(t, kvh, d, device=device).to(dtype)
    kc_t, vc_t = pool.k.clone(), pool.v.clone()
    out_t = TA.TritonAttentionBackend().forward(q, k, v, kc_t, vc_t, meta, d ** -0.5)
    out_r = TorchAttentionBackend().forward(q, k, v, pool.k, pool.v, meta, d ** -0.5)
    row = {"tokens": t, "decodes": nd, "prefills": len(prefill_spec),
           "max_err": max_err(out_t, out_r),
           "kv_equal": bool(torch.equal(kc_t, pool.k) and torch.equal(vc_t, pool.v))}
    if not row["max_err"] <= TOL[dtype]:
        failures.append(f"mixed forward: max error {row['max_err']:.3g} > {TOL[dtype]}")
    if not row["kv_equal"]:
        failures.append("mixed forward: KV cache differs from the reference write")
    be = TA.TritonAttentionBackend()
    row["triton_us"] = bench_ms(lambda: be.forward(q, k, v, kc_t, vc_t, meta, d ** -0.5), a.rep_ms, cuda) * 1e3
    if cuda:
        row["host_us"] = host_us(lambda: be.forward(q, k, v, kc_t, vc_t, meta, d ** -0.5))
    if not a.no_ref_timing:
        rb = TorchAttentionBackend()
        row["ref_us"] = bench_ms(lambda: rb.forward(q, k, v, pool.k, pool.v, meta, d ** -0.5), a.rep_ms, cuda) * 1e3
        row["speedup"] = row["ref_us"] / row["triton_us"]
    print("  mixed: " + ", ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
    return row


def run_tune(a, pool, dtype, device, cuda):
    """Decode: split count, then tile/warps/stages per shape (CUDA graph timing). Prefill: tiles."""
    h, kvh, d = a.heads, a.kv_heads, a.head_dim
    scale = d ** -0.5
    timer = (lambda fn: bench_graph_ms(fn, a.rep_ms, cuda)) if cuda else (lambda fn: bench_ms(fn, a.rep_ms, cuda))
    if a.smoke:
        shapes, cfgs = [(1, 40)], [(16, 4, 1), (32, 4, 2)]
        split_opts = [1, 2]
    else:
        shapes = [(1, 1024), (1, 4096), (8, 2048), (32, 1024), (64, 2048), (128, 512), (256, 1024), (256, 4096)]
        cfgs = [(bn, w, st) for bn in (32, 64, 128) for w in (2, 4, 8) for st in (1, 2, 3)]
        split_opts = [1, 2, 4, 8, 16, 32, 64]
    out = {"decode": [], "prefill": []}
    for b, ctx in shapes:
        rec = {"batch": b, "ctx": ctx}
        try:
            lens_l = [ctx] * b
            lens = torch.tensor(lens_l, dtype=torch.int32, device=device)
            bt = pool.tables(lens_l, seed=b + ctx)
            q = torch.randn(b, h, d, device=device).to(dtype)

            def call(ns, bn=None, w=4, st=2):
                return TA.paged_decode_attention_triton(q, pool.k, pool.v, bt, lens, scale, ctx, num_splits=ns,
                                                        block_n=bn, num_warps=w, num_stages=st)

            splits_t = {ns: timer(lambda: call(ns)) * 1e3 for ns in split_opts}
            best_ns = min(splits_t, key=splits_t.get)
            rec.update(heuristic_splits=TA.choose_num_splits(b, kvh, ctx, device),
                       splits_us=splits_t, best_splits=best_ns)
            cfg_t = {}
            for bn, w, st in cfgs:
                try:
                    cfg_t[f"n{bn}_w{w}_s{st}"] = timer(lambda: call(best_ns, bn, w, st)) * 1e3
                except Exception as e:  # e.g. out of shared memory
                    cfg_t[f"n{bn}_w{w}_s{st}"] = None
                    print(f"    cfg n{bn} w{w} s{st}: {type(e).__name__}: {str(e)[:120]}")
            ok = {k: v for k, v in cfg_t.items() if v is not None}
            rec.update(cfg_us=cfg_t, best_cfg=min(ok, key=ok.get), best_cfg_us=min(ok.values()),
                       default_us=splits_t[best_ns])
            kv_bytes = sum(lens_l) * kvh * d * pool.k.element_size() * 2
            rec["kv_MB"] = kv_bytes / 1e6
        except Exception as e:
            traceback.print_exc()
            rec["error"] = repr(e)
        out["decode"].append(rec)
        print(f"  tune decode b={b} ctx={ctx}: best_splits={rec.get('best_splits')} "
              f"({_fmt(rec.get('splits_us', {}).get(rec.get('best_splits')))} us; heuristic "
              f"{rec.get('heuristic_splits')}: {_fmt(rec.get('splits_us', {}).get(rec.get('heuristic_splits')))} us) "
              f"best_cfg={rec.get('best_cfg')} {_fmt(rec.get('best_cfg_us'))} us", flush=True)

    if a.smoke:
        pcases = [("prompts", [(0, 20), (0, 7)])]
        pcfgs = [(16, 16, 4, 1)]
    else:
        pcases = [("1x2048 prompt", [(0, 2048)]), ("4x1024 prompts", [(0, 1024)] * 4),
                  ("64x128 prompts", [(0, 128)] * 64), ("chunk 512 after 3584", [(3584, 512)])]
        pcfgs = [(bm, bn, w, st) for bm, bn in ((64, 64), (128, 64), (64, 128), (128, 128), (128, 32))
                 for w in (4, 8) for st in (2, 3)]
    for name, spec in pcases:
        rec = {"case": name}
        try:
            ctx = [p_ + c for p_, c in spec]
            qs = [0]
            for _, c in spec:
                qs.append(qs[-1] + c)
            bt = pool.tables(ctx, seed=len(spec) + ctx[0])
            q = torch.randn(qs[-1], h, d, device=device).to(dtype)
            qs_t = torch.tensor(qs, dtype=torch.int32, device=device)
            ctx_t = torch.tensor(ctx, dtype=torch.int32, device=device)
            max_q = max(c for _, c in spec)
            flops = sum(4 * h * d * (c * p_ + c * (c + 1) / 2) for p_, c in spec)
            res = {}
            for bm, bn, w, st in pcfgs:
                key = f"m{bm}_n{bn}_w{w}_s{st}"
                try:
                    t = bench_ms(lambda: TA.paged_prefill_attention_triton(
                        q, pool.k, pool.v, bt, qs_t, ctx_t, max_q, scale, block_m=bm, block_n=bn,
                        num_warps=w, num_stages=st), a.rep_ms, cuda)
                    res[key] = flops / (t / 1e3) / 1e12
                except Exception as e:
                    res[key] = None
                    print(f"    cfg {key}: {type(e).__name__}: {str(e)[:120]}")
            ok = {k: v for k, v in res.items() if v is not None}
            rec.update(tflops=res, best_cfg=max(ok, key=ok.get), best_tflops=max(ok.values()))
        except Exception as e:
            traceback.print_exc()
            rec["error"] = repr(e)
        out["prefill"].append(rec)
        print(f"  tune prefill {name}: best={rec.get('best_cfg')} {_fmt(rec.get('best_tflops'))} TFLOP/s "
              f"(m64_n64_w4_s2: {_fmt(rec.get('tflops', {}).get('m64_n64_w4_s2'))})", flush=True)
    return out


def main():
    a = parse_args()
    cuda = torch.cuda.is_available() and not a.smoke
    if not cuda and not a.smoke:
        print("no CUDA device: run with --smoke for the CPU interpreter check", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(0)
    failures: list[str] = []
    result = {
        "shape": {"heads": a.heads, "kv_heads": a.kv_heads, "head_dim": a.head_dim,
                  "block_size": a.block_size, "dtype": a.dtype},
        "env": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
                "device": torch.cuda.get_device_name() if cuda else "cpu (TRITON_INTERPRET)",
                "sm_count": TA._sm_count(device), "smoke": a.smoke},
    }
    out_dir = a.out or os.environ.get("OUT") or "out"
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "gpu_attention.json")

    def save():
        result["failures"] = failures
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

    bw = measure_copy_bandwidth(device, cuda, a.rep_ms)
    result["copy_bandwidth_GBps"] = bw / 1e9
    print(f"device: {result['env']['device']}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"D2D copy bandwidth: {bw / 1e9:.0f} GB/s (read + write)")

    batches = [int(x) for x in a.batches.split(",") if x]
    contexts = [int(x) for x in a.contexts.split(",") if x]
    bs = a.block_size
    nb = max(batches) * math.ceil(max(contexts) / bs) + 8
    if not a.smoke:  # room for the largest prefill case too
        nb = max(nb, 16 * math.ceil(4096 / bs) + 8)
    pool = Pool(nb, bs, a.kv_heads, a.head_dim, dtype, device)
    print(f"KV pool: {nb} blocks, {2 * pool.k.numel() * pool.k.element_size() / 1e9:.2f} GB")

    if a.tune:
        print("\n== tune ==", flush=True)
        result["tune"] = run_tune(a, pool, dtype, device, cuda)
        save()
        if a.skip_main:
            print(f"\nJSON: {path}")
            return 0
    print("\n== decode ==", flush=True)
    result["decode"] = run_decode(a, pool, dtype, device, cuda, bw, failures)
    save()
    print("\n== prefill ==", flush=True)
    result["prefill"] = run_prefill(a, pool, dtype, device, cuda, failures)
    save()
    del pool
    if cuda:
        torch.cuda.empty_cache()
    print("\n== mixed batch through the backend ==", flush=True)
    try:
        result["mixed"] = run_mixed(a, dtype, device, cuda, failures)
    except Exception as e:
        traceback.print_exc()
        failures.append(f"mixed: {e!r}")
    save()

    print("\nDecode attention, one layer (us; bound = KV bytes / copy bandwidth; % = bound / time)")
    print(fmt_table(result["decode"], ["batch", "ctx", "kv_MB", "splits", "max_err", "triton_us", "graph_us",
                                       "host_us", "ref_us", "speedup", "bound_us", "pct_bound", "pct_bound_graph", "GBps",
                                       "best_splits", "best_us"]))
    print("\nPrefill attention, one layer")
    print(fmt_table(result["prefill"], ["case", "tokens", "max_err", "triton_us", "ref_us", "speedup", "TFLOPs"]))
    if "mixed" in result:
        print("\nMixed batch, backend forward (KV write + decode + prefill)")
        print(fmt_table([result["mixed"]], ["tokens", "decodes", "prefills", "max_err", "kv_equal", "triton_us",
                                            "host_us", "ref_us", "speedup"]))
    print(f"\nJSON: {path}")
    if failures:
        print("\nFAILED CHECKS:\n  " + "\n  ".join(failures))
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
