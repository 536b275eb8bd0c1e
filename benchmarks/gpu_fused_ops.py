"""Fused decoder-layer ops (pagedserve.model.kernels.fused_ops) vs the eager torch reference.

    python benchmarks/gpu_fused_ops.py             # on CUDA: 7B and 0.5B shapes, bf16
    python benchmarks/gpu_fused_ops.py --dry-run   # CPU, Triton interpreter, tiny shapes

Shapes (Qwen2.5): 7B  H=3584, I=18944, 28 q + 4 kv heads, head_dim 128;
                  0.5B H=896, I=4864, 14 q + 2 kv heads, head_dim 64;
tokens per call T in --tokens (default 1, 32, 256, 2048).

Per (model, op, T): both versions are checked (max error in ulps of the
dtype; RoPE's counted at each rotated pair's length, see tests/model/test_fused_ops.py),
then timed on CUDA by replaying a CUDA graph of --inner calls (launch overhead
gone, as in the engine's decode graphs), median over --reps replays, in µs
per call. GB/s = bytes the op must move (inputs read once, outputs written
once) / fused time; `bw%` compares it with a device-to-device copy measured in
the same run. `layer` sums one decoder layer's elementwise work:
2 x add_rms_norm (reference: add + norm), rope, silu_mul.

Prints a table; writes JSON to $OUT/gpu_fused_ops.json (else ./out/).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

DRY = "--dry-run" in sys.argv
if DRY:  # must precede the first triton import
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from pagedserve.model.kernels import fused_ops as FO  # noqa: E402

MODELS = {
    "7B": dict(h=3584, i=18944, nh=28, nkv=4, d=128),
    "0.5B": dict(h=896, i=4864, nh=14, nkv=2, d=64),
}
TINY = {"tiny": dict(h=96, i=160, nh=4, nkv=2, d=32)}
LAYER_COUNT = {"add_rms_norm": 2, "rope": 1, "silu_mul": 1}  # per decoder layer
MANT = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter, tiny shapes, no real timing")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--tokens", default="1,32,256,2048")
    ap.add_argument("--models", default="7B,0.5B")
    ap.add_argument("--inner", type=int, default=20, help="calls per CUDA graph")
    ap.add_argument("--reps", type=int, default=50, help="graph replays timed (median)")
    ap.add_argument("--eps", type=float, default=1e-6)
    ap.add_argument("--out", default=None, help="output folder (default $OUT or ./out)")
    a = ap.parse_args()
    if a.dry_run:
        a.tokens, a.inner, a.reps = "1,3", 2, 2
    return a


# ------------------------------------------------------------------ timing
def time_us(fn, inner: int, reps: int, cuda: bool) -> float:
    """Median µs per call of fn."""
    if not cuda:
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(ts)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # compile / warm up outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(inner):
            fn()
    for _ in range(3):
        g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        ts.append(start.elapsed_time(end) * 1e3 / inner)
    del g
    return statistics.median(ts)


def copy_bandwidth_gbs(device: torch.device) -> float | None:
    """Device-to-device copy of 512 MiB: bytes read + written per second."""
    if device.type != "cuda":
        return None
    a = torch.empty(256 * 2 ** 20, dtype=torch.float16, device=device)
    b = torch.empty_like(a)
    us = time_us(lambda: b.copy_(a), inner=5, reps=20, cuda=True)
    return 2 * a.numel() * a.element_size() / (us * 1e-6) / 1e9


# ------------------------------------------------------------------ accuracy
def max_ulp(out: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor | None = None) -> float:
    a, b = out.double(), ref.double()
    m = torch.maximum(a.abs(), b.abs()) if mag is None else mag.double()
    m = m.clamp_min(torch.finfo(out.dtype).tiny)
    _, e = torch.frexp(m)
    ulp = torch.ldexp(torch.ones_like(m), e - 1 - MANT[out.dtype])
    return float(((a - b).abs() / ulp).max())


def rope_out_of_place(x, cos, sin):
    """What llama.py's BoundRope.rotate does today (a new tensor)."""
    return x * cos + FO._rotate_half(x) * sin


# ------------------------------------------------------------------ cases
def make_ops(m: dict, t: int, dtype, device, eps: float):
    """[(op, ref_fn, fused_fn, bytes, max_ulp)] for one model shape and token count."""
    g = torch.Generator().manual_seed(t)
    e = torch.finfo(dtype).bits // 8

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

    h, i, nh, nkv, d = m["h"], m["i"], m["nh"], m["nkv"], m["d"]
    x, res, w = rnd(t, h), rnd(t, h, scale=4.0), (1 + 0.2 * rnd(h).float()).to(dtype)
    gu = rnd(t, 2 * i, scale=3.0)
    qkv = rnd(t, (nh + 2 * nkv) * d, scale=2.0)
    qk = qkv[:, :(nh + nkv) * d].view(t, nh + nkv, d)
    pos = torch.randint(0, 32768, (t,), generator=g).float()
    inv = 1.0 / 1e6 ** (torch.arange(0, d, 2).float() / d)
    emb = torch.cat([torch.outer(pos, inv)] * 2, dim=-1)
    cos, sin = emb.cos().to(dtype).to(device)[:, None], emb.sin().to(dtype).to(device)[:, None]

    ops = []
    # accuracy on fresh copies, before any timing mutates the in-place operands
    u = max_ulp(FO.rms_norm(x, w, eps).cpu(), FO.rms_norm_ref(x, w, eps).cpu())
    ops.append(("rms_norm", lambda: FO.rms_norm_ref(x, w, eps), lambda: FO.rms_norm(x, w, eps),
                (2 * t * h + h) * e, u))

    y, nr = FO.add_rms_norm(x, res.clone(), w, eps)
    r_ref = res + x
    u = max(max_ulp(y.cpu(), FO.rms_norm_ref(r_ref, w, eps).cpu()), max_ulp(nr.cpu(), r_ref.cpu()))
    res_t = res.clone()

    def add_ref():
        r = res_t + x
        return FO.rms_norm_ref(r, w, eps), r

    ops.append(("add_rms_norm", add_ref, lambda: FO.add_rms_norm(x, res_t, w, eps), (4 * t * h + h) * e, u))

    u = max_ulp(FO.silu_mul(gu).cpu(), FO.silu_mul_ref(gu).cpu())
    ops.append(("silu_mul", lambda: FO.silu_mul_ref(gu), lambda: FO.silu_mul(gu), 3 * t * i * e, u))

    qk0 = qk.clone()
    ref = rope_out_of_place(qk0, cos, sin)
    FO.rope_(qk, cos, sin)
    xd, half = qk0.double(), d // 2
    pair = torch.cat([xd[..., :half]] * 2, -1).hypot(torch.cat([xd[..., half:]] * 2, -1))
    u = max_ulp(qk.cpu(), ref.cpu(), pair.cpu())
    ops.append(("rope", lambda: rope_out_of_place(qk, cos, sin), lambda: FO.rope_(qk, cos, sin),
                (2 * t * (nh + nkv) * d + 2 * t * d) * e, u))
    return ops


def main() -> int:
    a = parse_args()
    cuda = torch.cuda.is_available() and not a.dry_run
    if not cuda and not a.dry_run:
        print("no CUDA device: run with --dry-run for the CPU/interpreter check", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, a.dtype)
    models = TINY if a.dry_run else {k: MODELS[k] for k in a.models.split(",")}
    tokens = [int(v) for v in a.tokens.split(",")]
    bw = copy_bandwidth_gbs(device)
    if FO._triton_for(torch.empty(1, device=device)) is None:
        print("Triton kernels unavailable for this device", file=sys.stderr)
        return 2

    rows = []
    hdr = f"{'model':>5} {'op':>13} {'T':>5} {'ref µs':>9} {'fused µs':>9} {'speedup':>8} " \
          f"{'ref GB/s':>9} {'fused GB/s':>10} {'bw%':>5} {'max ulp':>7}"
    dev = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter, dry run: times are not GPU times)"
    print(f"device: {dev}; dtype {a.dtype}" + (f"; copy bandwidth {bw:.0f} GB/s" if bw else ""))
    print(hdr)
    for name, m in models.items():
        for t in tokens:
            layer_ref = layer_fused = layer_bytes = 0.0
            for op, ref_fn, fused_fn, nbytes, u in make_ops(m, t, dtype, device, a.eps):
                ref_us = time_us(ref_fn, a.inner, a.reps, cuda)
                fused_us = time_us(fused_fn, a.inner, a.reps, cuda)
                k = LAYER_COUNT.get(op, 0)
                layer_ref += k * ref_us
                layer_fused += k * fused_us
                layer_bytes += k * nbytes
                rows.append(_row(name, op, t, ref_us, fused_us, nbytes, bw, u))
            rows.append(_row(name, "layer", t, layer_ref, layer_fused, layer_bytes, bw, None))
            for r in rows[-5:]:
                print(_fmt(r))
    out_dir = a.out or os.environ.get("OUT") or "out"
    os.makedirs(out_dir, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name() if cuda else "cpu-interpreter", dtype=a.dtype,
                torch=torch.__version__, triton=_triton_version(), python=platform.python_version(),
                copy_bw_gbs=bw, inner=a.inner, reps=a.reps, dry_run=a.dry_run)
    path = os.path.join(out_dir, "gpu_fused_ops.json")
    with open(path, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"wrote {path}")
    # bf16/fp16: the documented 1-2 ulp; fp32: a few ulp of reduction order / exp (~1e-6 relative)
    limit = 2 if dtype != torch.float32 else 64
    bad = [r for r in rows if r["max_ulp"] is not None and r["max_ulp"] > limit]
    if bad:
        print(f"ACCURACY CHECK FAILED for {[(r['model'], r['op'], r['T']) for r in bad]}", file=sys.stderr)
        return 1
    return 0


def _row(model, op, t, ref_us, fused_us, nbytes, bw, u):
    fused_gbs = nbytes / (fused_us * 1e-6) / 1e9
    return dict(model=model, op=op, T=t, ref_us=ref_us, fused_us=fused_us, speedup=ref_us / fused_us,
                bytes=nbytes, ref_gbs=nbytes / (ref_us * 1e-6) / 1e9, fused_gbs=fused_gbs,
                bw_frac=fused_gbs / bw if bw else None, max_ulp=u)


def _fmt(r) -> str:
    bwp = f"{100 * r['bw_frac']:4.0f}%" if r["bw_frac"] is not None else "    -"
    u = f"{r['max_ulp']:7.2f}" if r["max_ulp"] is not None else "      -"
    return (f"{r['model']:>5} {r['op']:>13} {r['T']:>5} {r['ref_us']:9.1f} {r['fused_us']:9.1f} "
            f"{r['speedup']:7.2f}x {r['ref_gbs']:9.1f} {r['fused_gbs']:10.1f} {bwp} {u}")


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())
