#!/usr/bin/env python
"""GPU: Triton weight-only GEMMs (int8 per-channel, AWQ int4 g128) vs bf16 F.linear on 7B-shaped matrices.

Llama-2-7B's projections (hidden 4096, intermediate 11008), fused as pagedserve fuses them, at batch
(rows) 1..256. Also times torch's `_weight_int8pack_mm` when this torch build has it for CUDA. Each
cell is the median of triton.testing.do_bench; prints a table of microseconds and speed-up vs bf16 and
writes JSON. Before timing, one correctness line per (shape, M): each kernel's max abs error against the
fp32 dequantized reference (x.float() @ W_deq^T), relative to the reference's max |value|; with bf16 output
expect < ~4e-3 (one bf16 rounding; the line is flagged above 1e-2). Needs a CUDA GPU.

    .venv/bin/python benchmarks/gpu_quant.py [--out benchmarks/results/gpu_quant.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (4096, 3 * 4096), "o": (4096, 4096), "gate_up": (4096, 2 * 11008), "down": (11008, 4096)}
BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/gpu_quant.json")
    p.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from triton.testing import do_bench

    from pagedserve.model.awq_format import dequantize, rtn_quantize
    from pagedserve.model.quantization import quantize_int8
    from pagedserve.model.triton_quant import awq_linear_triton, int8_linear_triton

    dev, rows, errs = torch.device("cuda"), [], {}

    def weights(k: int, n: int):
        w = torch.randn(n, k, device=dev) * 0.02
        q8, s8 = quantize_int8(w)
        qw, qz, sc = (t.to(dev) for t in rtn_quantize(w.cpu(), 128))
        return w.bfloat16(), q8, s8.bfloat16(), qw, qz, sc.bfloat16()

    # Correctness first, for every (shape, M), so a crash or a slow timing run cannot hide it.
    for name, (k, n) in SHAPES.items():
        _, q8, s8, qw, qz, sc = weights(k, n)
        deq8, deq4 = q8.float() * s8.float()[:, None], dequantize(qw, qz, sc)  # fp32, exact
        for m in args.batches:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            e8 = _rel_err(int8_linear_triton(x, q8, s8), F.linear(x.float(), deq8))
            e4 = _rel_err(awq_linear_triton(x, qw, qz, sc), F.linear(x.float(), deq4))
            errs[name, m] = (e8, e4)
            print(f"check {name:<8} M={m:<4} max|y-ref|/max|ref|: int8 {e8:.2e} | awq {e4:.2e}"
                  + ("  <-- WRONG" if max(e8, e4) > 1e-2 else ""), flush=True)
    worst = max(max(e) for e in errs.values())
    print(f"worst relative error {worst:.2e}" + (" -- FAILED (> 1e-2)" if worst > 1e-2 else " (ok)"), flush=True)

    for name, (k, n) in SHAPES.items():
        wb, q8, s8, qw, qz, sc = weights(k, n)
        torch_i8 = True
        try:
            torch._weight_int8pack_mm(torch.randn(2, k, device=dev, dtype=torch.bfloat16), q8, s8)
        except Exception:
            torch_i8 = False
        for m in args.batches:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            r = {"shape": name, "k": k, "n": n, "m": m, "int8_rel_err": errs[name, m][0],
                 "awq_rel_err": errs[name, m][1],
                 "bf16_us": do_bench(lambda: F.linear(x, wb), return_mode="median") * 1e3,
                 "int8_triton_us": do_bench(lambda: int8_linear_triton(x, q8, s8), return_mode="median") * 1e3,
                 "awq_triton_us": do_bench(lambda: awq_linear_triton(x, qw, qz, sc), return_mode="median") * 1e3}
            if torch_i8:
                r["int8_torch_us"] = do_bench(lambda: torch._weight_int8pack_mm(x, q8, s8),
                                              return_mode="median") * 1e3
            rows.append(r)
            print(f"{name:<8} M={m:<4} bf16 {r['bf16_us']:8.1f} us | int8 triton {r['int8_triton_us']:8.1f} "
                  f"({r['bf16_us'] / r['int8_triton_us']:.2f}x)"
                  + (f" | int8 torch {r['int8_torch_us']:8.1f}" if torch_i8 else "")
                  + f" | awq triton {r['awq_triton_us']:8.1f} ({r['bf16_us'] / r['awq_triton_us']:.2f}x)",
                  flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows},
                              indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
