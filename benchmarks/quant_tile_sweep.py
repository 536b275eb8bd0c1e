#!/usr/bin/env python
"""GPU: the quantized GEMMs on the 7B shape against bf16 cuBLAS, and the tile sweep behind the W8A8 kernel's
static table (triton_w8a8._TILES) and the dispatch (quantization/dispatch.py).

For each projection (qkv, o, gate_up, down of Qwen2.5-7B) and each M, timed as CUDA-graph replays (median
us; the engine's decode runs in graphs, so host launch overhead is left out):
* bf16 F.linear (cuBLAS); fp8 through torch's rowwise `_scaled_mm` (with our per-token quant); AWQ int4
  through the Triton kernel and through dequantize + cuBLAS (the two sides of DENSE_FROM_M);
* every candidate tile config of the W8A8 Triton GEMM, fp8 and int8 (the activation quant included; for
  M <= 64 also with the operands swapped, y^T = W x^T),
  each first checked against the fp32 arithmetic of the same quantized operands (a wrong one is reported
  and never chosen); and below AWQ's dense switch (M < 128) the AWQ kernel's tile configs x splits (its
  K-strided layout), checked against the dequantized product. quant_tile_sweep_awq_h200.json also holds
  the checkpoint-layout kernel that the K-strided one replaced ("awq R" candidates), and
  quant_tile_sweep_awq_wide_h200.json a dropped variant with one dot of depth 128 a block ("x128"; "x16"
  is the kernel kept, 8 dots of depth 16).
Printed per M, summed over the four projections (one decoder layer's GEMMs): the best config per
projection, and the best single config for all four ("uniform": what a static table keyed on M can do).
results/quant_tile_sweep_h200.json also holds the first run's weight-only kernels (a GEMV and the old
tl.dot kernel, since deleted: W8A8 beat both at every M) and `_int_mm`.

    python benchmarks/quant_tile_sweep.py --out $OUT/quant_tile_sweep.json     # ~3-4 min on an H200
    python benchmarks/quant_tile_sweep.py --kinds awq --ms 1,16,32,64,128      # the AWQ kernel's tiles
    python benchmarks/quant_tile_sweep.py --dry-run                            # CPU interpreter, tiny shapes
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
import torch.nn.functional as F  # noqa: E402

GEMM_TILES = {  # M bucket upper bound -> (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
    32: [(16, 64, 256, 4, 4), (16, 128, 128, 4, 4), (32, 64, 256, 4, 4), (64, 64, 256, 4, 4), (64, 128, 128, 4, 4),
         (16, 64, 128, 4, 5), (32, 128, 128, 4, 4)],
    64: [(64, 64, 256, 4, 4), (64, 128, 128, 4, 4), (64, 128, 256, 4, 3), (32, 128, 128, 4, 4), (64, 64, 128, 4, 5)],
    128: [(64, 128, 128, 4, 4), (128, 128, 128, 8, 4), (64, 256, 128, 8, 3), (128, 64, 128, 4, 4),
          (64, 128, 256, 4, 3)],
    1 << 30: [(128, 128, 128, 8, 4), (128, 256, 128, 8, 3), (128, 128, 256, 8, 3), (64, 256, 128, 8, 4),
              (256, 128, 128, 8, 3), (128, 128, 128, 4, 4)],
}
SPLIT_FACTORS = (0.5, 1, 2)  # x the table's K split, for shapes that split
# y^T = W x^T (the kernel's SWAP_AB) for decode-sized M: BLOCK_N weight rows are the dot's first side
SWAP_TILES = {32: [(16, 64, 256, 4, 4), (16, 128, 128, 4, 4), (16, 128, 256, 4, 3), (16, 64, 128, 4, 5),
                   (32, 64, 256, 4, 4), (32, 128, 128, 4, 4), (16, 256, 128, 8, 3)],
              64: [(32, 128, 128, 4, 4), (64, 128, 128, 4, 4), (32, 64, 256, 4, 4)]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ms", default="1,4,8,16,32,64,128,256,512,1024,2048")
    p.add_argument("--kinds", default="fp8,int8,awq")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    a.ms = [int(m) for m in a.ms.split(",")]
    a.kinds = a.kinds.split(",")
    if a.dry_run:
        a.ms = [1, 4, 32, 130]
    return a


def shapes(dry: bool) -> dict[str, tuple[int, int]]:
    """name -> (K, N) of the fused projections, as the engine runs them."""
    if dry:
        return {"qkv": (256, 96), "down": (512, 64)}
    h, inter, heads, kv, hd = 3584, 18944, 28, 4, 128
    return {"qkv": (h, (heads + 2 * kv) * hd), "o": (heads * hd, h), "gate_up": (h, 2 * inter), "down": (inter, h)}


def bench(fn, cuda: bool) -> float:
    if cuda:
        from triton.testing import do_bench_cudagraph

        return do_bench_cudagraph(fn, rep=10, return_mode="median") * 1e3
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e6


def rel(y, ref) -> float:
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30)).item()


def main(argv=None) -> int:
    args = parse_args(argv)
    from pagedserve.quantization.awq_format import dequantize, rtn_quantize
    from pagedserve.quantization.fp8 import fp8_linear_cuda, quantize_fp8_rows
    from pagedserve.quantization.methods import quantize_int8
    from pagedserve.quantization.awq_format import to_kstrided
    from pagedserve.quantization.triton_quant import TileConfig, _sms, awq_linear, awq_linear_dense
    from pagedserve.quantization.triton_w8a8 import _gemm_config, k_split, per_token_quant, w8a8_gemm, whole_splits

    cuda = torch.cuda.is_available() and not args.dry_run
    dev = torch.device("cuda" if cuda else "cpu")
    dt = torch.bfloat16 if cuda else torch.float32
    sms = _sms(dev)
    rows: list[dict] = []
    t_start = time.time()
    for name, (k, n) in shapes(args.dry_run).items():
        w = torch.randn(n, k, device=dev) * 0.02
        wb = w.to(dt)
        q8, s8 = quantize_int8(w)
        quant = {"fp8": quantize_fp8_rows(w), "int8": (q8, s8.float())}
        awq = rtn_quantize(w.cpu(), 128)
        awq_ref = dequantize(*awq).float().to(dev)
        awq = (*(t.to(dev) for t in to_kstrided(awq[0], awq[1])), awq[2].to(dev, dt))  # the GPU kernels' layout
        del w
        for m in args.ms:
            x = torch.randn(m, k, device=dev).to(dt)
            r = {"shape": name, "k": k, "n": n, "m": m, "bf16": bench(lambda: F.linear(x, wb), cuda), "cand": {}}
            if "awq" in args.kinds:
                awq_want = F.linear(x.float(), awq_ref)
                for label, fn in (("awq_triton", lambda: awq_linear(x, *awq)),
                                  ("awq_dense", lambda: awq_linear_dense(x, *awq))):
                    if cuda:
                        err = rel(fn(), awq_want)
                        r[label] = bench(fn, cuda) if err < 2e-2 else float("nan")
                if m < 128:
                    sweep_awq(r, x, awq, awq_want, m, n, k, sms, dt, cuda)
            for kind in (kd for kd in args.kinds if kd != "awq"):
                qw, sw = quant[kind]
                qx, sx = per_token_quant(x, qw.dtype)
                ref = (qx.float() @ qw.float().t()) * sx * sw.float()[None, :]
                if cuda and kind == "fp8":
                    r["fp8_scaled_mm"] = bench(lambda: fp8_linear_cuda(x, qw, sw), cuda)
                r[f"{kind}_quant_us"] = bench(lambda: per_token_quant(x, qw.dtype), cuda)
                bucket = min(b for b in GEMM_TILES if m <= b)
                table = _gemm_config(m, n, k, sms, kind)
                cands = {(t, False) for t in GEMM_TILES[bucket]} | {((table.block_m, table.block_n, table.block_k,
                                                                     table.num_warps, table.num_stages), table.swap_ab)}
                if m <= max(SWAP_TILES):
                    cands |= {(t, True) for t in SWAP_TILES[min(b for b in SWAP_TILES if m <= b)]}
                for (bm, bn, bk, warps, stages), swap in sorted(cands):
                    if k % bk:
                        continue
                    n_tiles = -(-m // bm) * -(-n // bn)
                    auto = k_split(n_tiles, k // bk, sms, swap)  # the table's split rule, and its neighbours
                    factors = SPLIT_FACTORS + ((4,) if swap else ())
                    for f in (factors if auto > 1 else (1, 2, 4) if swap else (1, 2) if n_tiles < sms else (1,)):
                        split = whole_splits(int(auto * f), k // bk)
                        label = f"w8a8{'T' if swap else ''} {bm}x{bn}x{bk} w{warps} st{stages} s{split}"
                        if f"{kind} {label}" in r["cand"]:
                            continue
                        cfg = TileConfig(bm, bn, bk, split, warps, stages, swap)
                        us = timed_if_correct(f"{name} M={m} {kind} {label}", ref, cuda,
                                              lambda cfg=cfg: w8a8_gemm(qx, sx, qw, sw, None, dt, cfg))
                        if us is not None:
                            r["cand"][f"{kind} {label}"] = us + r[f"{kind}_quant_us"]
            rows.append(r)
            best = {}
            for kind in args.kinds:
                c = {lab: us for lab, us in r["cand"].items() if lab.startswith(f"{kind} ")}
                if c:
                    lab = min(c, key=c.get)
                    best[kind] = (c[lab], lab)
            cells = " ".join(f"{key} {us:6.1f}" for key, (us, _) in best.items())
            others = " ".join(f"{key} {r[key]:6.1f}" for key in ("fp8_scaled_mm", "awq_triton", "awq_dense") if key in r)
            print(f"{name:<8} M={m:<5} bf16 {r['bf16']:6.1f} | w8a8 {cells} | {others}  [{time.time() - t_start:.0f}s]",
                  flush=True)
        del wb, quant, awq, awq_ref
        if cuda:
            torch.cuda.empty_cache()
    summary = summarize(rows, args)
    out = Path(args.out or (Path(os.environ.get("OUT", ROOT / "benchmarks/results")) / "quant_tile_sweep.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(0) if cuda else "cpu (interpreter)",
                               "sms": sms, "rows": rows, "summary": summary}, indent=1))
    print(f"wrote {out}")
    return 0


def timed_if_correct(label: str, ref, cuda: bool, fn) -> float | None:
    """fn's median time, or None (said why) when it fails to compile or misses the fp32 reference."""
    try:
        err = rel(fn(), ref)
    except Exception as e:  # noqa: BLE001 - a config the compiler refuses is skipped
        print(f"  skip {label}: {type(e).__name__}: {str(e)[:120]}", flush=True)
        return None
    if err > 2e-2:
        print(f"  WRONG {label}: rel err {err:.2e}", flush=True)
        return None
    return bench(fn, cuda)


def sweep_awq(r: dict, x, awq, want, m: int, n: int, k: int, sms: int, dt, cuda: bool) -> None:
    """The AWQ kernel's candidates into r["cand"]: BLOCK_N x warps/stages x K split around awq_config's."""
    from pagedserve.quantization.triton_quant import TileConfig, awq_config, awq_linear

    auto = awq_config(m, n, k, sms)
    k_steps = k // 128
    for bn in (32, 64, 128):
        for warps, stages in ((4, 2), (4, 3), (4, 4), (8, 3)):
            n_tiles = -(-m // auto.block_m) * -(-n // bn)
            base = 1 if n_tiles >= 4 * sms else max(1, min(-(-4 * sms // n_tiles), k_steps // 2, 16))
            splits = set()
            for f in ((0.5, 1, 2) if base > 1 else (1, 2) if n_tiles < sms else (1,)):
                split = max(1, min(int(base * f), k_steps))
                per = -(-k_steps // split)
                splits.add(-(-k_steps // per))
            for split in sorted(splits):
                cfg = TileConfig(auto.block_m, bn, 128, split, warps, stages)
                label = f"awq {auto.block_m}x{bn}x128 w{warps} st{stages} s{split}"
                us = timed_if_correct(f"M={m} {label}", want, cuda, lambda cfg=cfg: awq_linear(x, *awq, cfg=cfg))
                if us is not None:
                    r["cand"][label] = us


def summarize(rows: list[dict], args) -> list[dict]:
    """Per M, summed over the projections: bf16, the torch/AWQ paths, W8A8 best-per-shape and uniform."""
    print("\n== per M, us summed over the projections (ratio = bf16 / path) ==")
    out = []
    for m in args.ms:
        rs = [r for r in rows if r["m"] == m]
        if not rs:
            continue
        s = {"m": m, "bf16": sum(r["bf16"] for r in rs)}
        for key in ("fp8_scaled_mm", "awq_triton", "awq_dense"):
            if all(key in r for r in rs):
                s[key] = sum(r[key] for r in rs)
        for kind in args.kinds:
            pre = f"{kind} "
            per_shape = [min((us for lab, us in r["cand"].items() if lab.startswith(pre)), default=None) for r in rs]
            if None in per_shape:
                continue
            s[f"{kind}_best"] = sum(per_shape)
            tiles: dict[str, list[float]] = {}  # the same tiles on every shape (split: best of the tried)
            for r in rs:
                per_tile: dict[str, float] = {}
                for lab, us in r["cand"].items():
                    if lab.startswith(pre):
                        key = lab.rsplit(" s", 1)[0]
                        per_tile[key] = min(per_tile.get(key, 1e18), us)
                for key, us in per_tile.items():
                    tiles.setdefault(key, []).append(us)
            full = {key: sum(v) for key, v in tiles.items() if len(v) == len(rs)}
            if full:
                key = min(full, key=full.get)
                s[f"{kind}_uniform"], s[f"{kind}_uniform_tiles"] = full[key], key
        out.append(s)
        b = s["bf16"]
        print(f"M={m:<5} bf16 {b:7.1f} | " + " | ".join(
            f"{k} {v:7.1f} ({b / v:.2f}x)" + (f" [{s[k + '_tiles']}]" if k + "_tiles" in s else "")
            for k, v in s.items() if k not in ("m", "bf16") and not k.endswith("_tiles")))
    return out


if __name__ == "__main__":
    sys.exit(main())
