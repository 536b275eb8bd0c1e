#!/usr/bin/env python
"""GPU: the small-M W8A8 GEMMs (decode) with cold weights, as the engine runs them, against bf16 cuBLAS and
vLLM's CUTLASS `cutlass_scaled_mm` when vLLM imports.

Why a second sweep: quant_tile_sweep.py replays one GEMM on one weight, so qkv (16.5 MB in fp8) and o
(12.8 MB) sit in the H200's 50 MB L2 and time up to 2x faster than in a decode step, where each layer's
weights stream from HBM once. Here every timed CUDA graph runs the GEMM over enough distinct weight copies
to fill twice the L2, and the time is per GEMM. This is the sweep behind triton_w8a8's small-M tiles.

Per projection of the 7B shape (qkv, o, gate_up, down) and M: bf16 F.linear, CUTLASS (vLLM), our table
config (`_gemm_config`), and candidate swapped tiles x K splits, each checked against the fp32
arithmetic of the same quantized operands first. Printed per M, summed over the four (one layer).

    python benchmarks/quant_cold_sweep.py --out $OUT/quant_cold_sweep.json        # ~1 min on an H200
    python benchmarks/quant_cold_sweep.py --kinds int8 --ms 1,16 --no-candidates  # table vs CUTLASS only
    python benchmarks/quant_cold_sweep.py --dry-run                                # CPU interpreter
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

L2_BYTES = 50 << 20  # H100/H200
CANDIDATES = [(16, 64, 256, 4, 4), (16, 64, 256, 4, 6), (16, 64, 512, 4, 3), (16, 128, 256, 4, 3),
              (16, 128, 256, 8, 4), (16, 256, 128, 8, 3), (16, 64, 128, 4, 6), (16, 128, 128, 4, 5),
              (16, 256, 256, 8, 3), (16, 128, 512, 8, 3)]  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), swapped


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ms", default="1,4,16")
    p.add_argument("--kinds", default="fp8")
    p.add_argument("--no-candidates", action="store_true", help="time only bf16, CUTLASS and the table")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    a.ms = [int(m) for m in a.ms.split(",")]
    a.kinds = a.kinds.split(",")
    if a.dry_run:
        a.ms, a.kinds = [1, 3], ["fp8", "int8"]
    return a


def per_call_us(fns, cuda: bool) -> float:
    """Median time of one call when `fns` (one per weight copy) run back to back in a CUDA graph."""
    def run():
        for f in fns:
            f()
    if not cuda:
        t0 = time.perf_counter()
        run()
        return (time.perf_counter() - t0) * 1e6 / len(fns)
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(run, rep=20, return_mode="median") * 1e3 / len(fns)


def cutlass_mm():
    """vLLM's CUTLASS scaled GEMM, or None without vLLM (it is a peer, never a dependency)."""
    try:
        from vllm import _custom_ops as ops
    except Exception:  # noqa: BLE001 - any import failure means no peer here
        return None
    return lambda qx, sx, qw, sw: ops.cutlass_scaled_mm(qx, qw.t(), sx, sw.view(-1, 1), torch.bfloat16)


def main(argv=None) -> int:
    args = parse_args(argv)
    from quant_tile_sweep import shapes  # the same projections as the single-weight sweep

    from pagedserve.quantization.fp8 import quantize_fp8_rows
    from pagedserve.quantization.methods import quantize_int8
    from pagedserve.quantization.triton_quant import TileConfig, _sms
    from pagedserve.quantization.triton_w8a8 import _gemm_config, _smem, k_split, per_token_quant, w8a8_gemm, whole_splits

    cuda = torch.cuda.is_available() and not args.dry_run
    dev = torch.device("cuda" if cuda else "cpu")
    dt = torch.bfloat16 if cuda else torch.float32
    sms, smem = _sms(dev), _smem(dev)
    cutlass = cutlass_mm() if cuda else None
    rows: list[dict] = []
    for kind in args.kinds:
        def quant(w):
            if kind == "fp8":
                return quantize_fp8_rows(w)
            q, s = quantize_int8(w)
            return q, s.float()
        for name, (k, n) in shapes(args.dry_run).items():
            copies = max(1, -(-2 * L2_BYTES // (n * k))) if cuda else 1
            ws = [quant(torch.randn(n, k, device=dev) * 0.02) for _ in range(copies)]
            wbs = [(torch.randn(n, k, device=dev) * 0.02).to(dt) for _ in range(max(1, copies // 2))]
            for m in args.ms:
                x = torch.randn(m, k, device=dev).to(dt)
                qx, sx = per_token_quant(x, ws[0][0].dtype)
                ref = (qx.float() @ ws[0][0].float().t()) * sx * ws[0][1].float()[None, :]
                table = _gemm_config(m, n, k, sms, kind, smem)
                r = {"kind": kind, "shape": name, "m": m, "weight_copies": copies, "table_cfg": str(table),
                     "bf16": per_call_us([lambda w=w: F.linear(x, w) for w in wbs], cuda), "cand": {}}

                def timed(cfg):
                    y = w8a8_gemm(qx, sx, *ws[0], None, dt, cfg).float()
                    err = ((y - ref).abs().max() / ref.abs().max()).item()
                    if err > 2e-2:
                        print(f"  WRONG {kind} {name} M={m} {cfg}: rel err {err:.2e}", flush=True)
                        return None
                    return per_call_us([lambda q=q, s=s: w8a8_gemm(qx, sx, q, s, None, dt, cfg) for q, s in ws], cuda)
                r["table"] = timed(table)
                if cutlass is not None:
                    r["cutlass"] = per_call_us([lambda q=q, s=s: cutlass(qx, sx, q, s) for q, s in ws], cuda)
                for bm, bn, bk, warps, stages in ([] if args.no_candidates else CANDIDATES):
                    if k % bk:
                        continue
                    base = k_split(-(-m // bm) * -(-n // bn), k // bk, sms, True)
                    for split in sorted({whole_splits(max(1, int(base * f)), k // bk) for f in (0.5, 1, 2, 4)} | {1}):
                        us = timed(TileConfig(bm, bn, bk, split, warps, stages, True))
                        if us is not None:
                            r["cand"][f"{bm}x{bn}x{bk} w{warps} st{stages} s{split}"] = us
                if r["cand"]:
                    r["best"] = list(min(r["cand"].items(), key=lambda kv: kv[1]))
                rows.append(r)
                best = f" best {r['best'][1]:6.1f} [{r['best'][0]}]" if "best" in r else ""
                print(f"{kind} {name:<8} M={m:<3} x{copies} bf16 {r['bf16']:6.1f} cutlass "
                      f"{r.get('cutlass', float('nan')):6.1f} table {r['table']:6.1f}{best}", flush=True)
            del ws, wbs
            if cuda:
                torch.cuda.empty_cache()
    print("\n== per M, us summed over the projections ==")
    summary = []
    for kind in args.kinds:
        for m in args.ms:
            rs = [r for r in rows if r["kind"] == kind and r["m"] == m]
            s = {"kind": kind, "m": m}
            for key in ("bf16", "cutlass", "table"):
                if all(r.get(key) is not None for r in rs):
                    s[key] = sum(r[key] for r in rs)
            if all("best" in r for r in rs):
                s["best_per_shape"] = sum(r["best"][1] for r in rs)
            summary.append(s)
            cells = " | ".join(f"{key} {v:7.1f}" for key, v in s.items() if key not in ("kind", "m"))
            print(f"{kind} M={m:<3} {cells}")
    out = Path(args.out or (Path(os.environ.get("OUT", ROOT / "benchmarks/results")) / "quant_cold_sweep.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(0) if cuda else "cpu (interpreter)", "sms": sms,
                               "rows": rows, "summary": summary}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
