#!/usr/bin/env python
"""GPU: the fused MoE kernel's tile sweep behind kernels/fused_moe._TILES, per (E, I, weight kind, T bucket).

For each MoE shape (Qwen3-30B-A3B: E=128, k=8, H=2048, I=768; Qwen1.5-MoE-A2.7B: E=60, k=4, H=2048,
I=1408; Mixtral-8x7B: E=8, k=2, H=4096, I=14336), each weight kind (bf16, fp8 per channel) and each token
count T, with uniformly random routing, timed as CUDA-graph replays (median us; decode runs in graphs):
* the kernel with the table's tiles (`moe_config`: the defaults until the table has the shape);
* candidates: for each BLOCK_M of T's bucket, the gate_up GEMM's tiles swept with the down GEMM's fixed,
  then the down GEMM's swept with the best gate_up; each candidate is first checked against the CPU
  path's arithmetic (layers/moe.experts_reference on the GPU); a wrong one is reported and never chosen;
* vLLM's `fused_experts` (bf16) when vLLM is importable, in the same process: the peer's kernel.
Prints a line per row, then the `_TILES` entries to paste into fused_moe.py, and writes the JSON.

    python benchmarks/moe_tile_sweep.py --out $OUT/moe_tile_sweep.json          # all shapes, ~10 min
    python benchmarks/moe_tile_sweep.py --shapes qwen3-30b-a3b --kinds fp8 --ts 1,8,64,512
    python benchmarks/moe_tile_sweep.py --dry-run                               # CPU interpreter, tiny
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

if "--dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

SHAPES = {  # name -> (E, top_k, H, I)
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "qwen1.5-moe-a2.7b": (60, 4, 2048, 1408),
    "mixtral-8x7b": (8, 2, 4096, 14336),
    "tiny": (8, 2, 64, 96),
}
BLOCK_M = {32: (16, 32), 256: (16, 32, 64), 1024: (32, 64, 128), 1 << 62: (64, 128)}  # T bucket -> BLOCK_Ms
GEMM = [(bn, bk, w, st) for bn, bk, w, st in (
    (32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (64, 128, 4, 4), (64, 256, 4, 3), (128, 64, 4, 3),
    (128, 64, 8, 4), (128, 128, 4, 3), (128, 128, 8, 3), (256, 64, 8, 3), (256, 128, 8, 3))]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="qwen3-30b-a3b,qwen1.5-moe-a2.7b,mixtral-8x7b")
    p.add_argument("--kinds", default="bf16,fp8")
    p.add_argument("--ts", default="1,2,4,8,16,32,64,128,256,512,1024,2048,4096")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    a.ts = [int(t) for t in a.ts.split(",")]
    a.shapes, a.kinds = a.shapes.split(","), a.kinds.split(",")
    if a.dry_run:
        a.shapes, a.ts = ["tiny"], [1, 40]
    return a


def bench(fn, cuda: bool) -> float:
    if cuda:
        from triton.testing import do_bench_cudagraph

        return do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e6


def rel(y, ref) -> float:
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30)).item()


def vllm_fused_experts():
    """vLLM's fused MoE entry point, or None when vLLM is not importable here."""
    try:
        from vllm.model_executor.layers.fused_moe import fused_experts
    except Exception:  # noqa: BLE001 - any import failure means: no peer in this run
        return None
    return fused_experts


def main(argv=None) -> int:
    args = parse_args(argv)
    from pagedserve.quantization.fp8 import quantize_fp8_rows
    from pagedserve.model.kernels.fused_moe import GemmTiles, MoeTiles, fused_moe, moe_config
    from pagedserve.model.layers.moe import experts_reference, route

    cuda = torch.cuda.is_available() and not args.dry_run
    dev = torch.device("cuda" if cuda else "cpu")
    dt = torch.bfloat16 if cuda else torch.float32
    peer = vllm_fused_experts() if cuda else None
    gemms = GEMM if cuda else [(32, 32, 4, 2), (64, 32, 4, 2)]
    rows: list[dict] = []
    t0 = time.time()
    for shape in args.shapes:
        e, k, h, inter = SHAPES[shape]
        g = torch.Generator(device=dev).manual_seed(0)
        w13 = (torch.randn(e, 2 * inter, h, device=dev, generator=g) * h ** -0.5).to(dt)
        w2 = (torch.randn(e, h, inter, device=dev, generator=g) * inter ** -0.5).to(dt)
        for kind in args.kinds:
            ws = (w13, w2, None, None)
            if kind == "fp8":
                (q13, s13), (q2, s2) = quantize_fp8_rows(w13), quantize_fp8_rows(w2)
                ws = (q13, q2, s13, s2)
            for t in args.ts:
                x = torch.randn(t, h, device=dev, generator=g).to(dt)
                weights, ids = route(torch.randn(t, e, device=dev, generator=g), k, True)
                ref = experts_reference(x, ws[0], ws[1], weights, ids, ws[2], ws[3])

                def run(tiles=None):
                    return fused_moe(x, ws[0], ws[1], weights, ids, ws[2], ws[3], tiles=tiles)

                table = moe_config(e, inter, t, kind == "fp8")
                r = {"shape": shape, "e": e, "k": k, "h": h, "i": inter, "kind": kind, "t": t,
                     "table_tiles": tiles_key(table), "table_us": timed(f"{shape} {kind} T={t} table", ref, cuda,
                                                                        lambda: run(table)), "cand": {}}
                if r["table_us"] is not None:
                    r["cand"][r["table_tiles"]] = r["table_us"]
                if peer is not None and kind == "bf16":
                    r["vllm_us"] = timed(f"{shape} T={t} vllm", ref, cuda,
                                         lambda: peer(x, ws[0], ws[1], weights, ids.to(torch.int32)))
                bms = next(v for top, v in BLOCK_M.items() if t <= top) if cuda else (16,)
                for bm in bms:
                    best_g, best_us = table.gate_up, None
                    for gt in gemms:
                        tiles = MoeTiles(bm, GemmTiles(*gt), table.down)
                        us = timed(f"{shape} {kind} T={t} {tiles_key(tiles)}", ref, cuda, lambda: run(tiles))
                        if us is not None:
                            r["cand"][tiles_key(tiles)] = us
                            if best_us is None or us < best_us:
                                best_g, best_us = GemmTiles(*gt), us
                    for dtl in gemms:
                        tiles = MoeTiles(bm, best_g, GemmTiles(*dtl))
                        key = tiles_key(tiles)
                        if key not in r["cand"]:
                            us = timed(f"{shape} {kind} T={t} {key}", ref, cuda, lambda: run(tiles))
                            if us is not None:
                                r["cand"][key] = us
                if r["cand"]:
                    r["best_tiles"] = min(r["cand"], key=r["cand"].get)
                    r["best_us"] = r["cand"][r["best_tiles"]]
                rows.append(r)
                peer_cell = f" vllm {r['vllm_us']:8.1f}" if r.get("vllm_us") else ""
                print(f"{shape:<18} {kind:<4} T={t:<5} table {fmt(r['table_us'])} best {fmt(r.get('best_us'))}"
                      f" [{r.get('best_tiles')}]{peer_cell}  [{time.time() - t0:.0f}s]", flush=True)
    print_table(rows)
    out = Path(args.out or (Path(os.environ.get("OUT", ROOT / "benchmarks/results")) / "moe_tile_sweep.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(0) if cuda else "cpu (interpreter)",
                               "vllm": peer is not None, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


def fmt(us: float | None) -> str:
    return f"{us:8.1f}" if us is not None else "       -"


def tiles_key(t) -> str:
    g, d = t.gate_up, t.down
    return (f"m{t.block_m} g{g.block_n}x{g.block_k}w{g.num_warps}s{g.num_stages}"
            f" d{d.block_n}x{d.block_k}w{d.num_warps}s{d.num_stages}")


def parse_key(key: str) -> tuple:
    import re

    n = [int(v) for v in re.findall(r"\d+", key)]
    return n[0], tuple(n[1:5]), tuple(n[5:9])


def timed(label: str, ref, cuda: bool, fn) -> float | None:
    """fn's median time, or None (said why) when it fails to compile or misses the reference."""
    try:
        err = rel(fn(), ref)
    except Exception as e:  # noqa: BLE001 - a config the compiler refuses is skipped
        print(f"  skip {label}: {type(e).__name__}: {str(e)[:120]}", flush=True)
        return None
    if err > 3e-2:
        print(f"  WRONG {label}: rel err {err:.2e}", flush=True)
        return None
    return bench(fn, cuda)


def print_table(rows: list[dict]) -> None:
    """The best tiles per row as fused_moe._TILES entries (one bucket per swept T, equal neighbours merged)."""
    print("\n== fused_moe._TILES entries ==")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "best_tiles" in r:
            groups.setdefault((r["e"], r["i"], r["kind"]), []).append(r)
    for (e, inter, kind), rs in groups.items():
        rs.sort(key=lambda r: r["t"])
        buckets: list[tuple[int, str]] = []
        for i, r in enumerate(rs):
            top = r["t"] if i + 1 < len(rs) else 1 << 62
            if buckets and buckets[-1][1] == r["best_tiles"]:
                buckets[-1] = (top, r["best_tiles"])
            else:
                buckets.append((top, r["best_tiles"]))
        cells = ", ".join(f"({'1 << 62' if top == 1 << 62 else top}, _tiles{parse_key(key)})" for top, key in buckets)
        print(f"    ({e}, {inter}, {kind!r}): ({cells},),")
        gain = [r["table_us"] / r["best_us"] for r in rs if r.get("table_us") and r.get("best_us")]
        if gain:
            print("    # table/best: " + " ".join(f"T={r['t']} {x:.2f}x" for r, x in zip(rs, gain)))


if __name__ == "__main__":
    sys.exit(main())
