#!/usr/bin/env python
"""GPU probe: torch's own int4 GEMM (tinygemm, `torch._weight_int4pack_mm`) against our AWQ kernels and bf16
cuBLAS on the 7B projections, M = 1..512, CUDA-graph replays (median us; one weight, so L2-warm).

Asked because "well-kept library over hand-written kernel" applies if torch's kernel is faster. The AWQ
weight maps exactly onto tinygemm's form: w = (q - z) s = (q - 8) s + (8 - z) s, the second term as its
per-group "zero" (rounded once to bf16). Result on an H200 (results/awq_tinygemm_probe_h200.json), us
summed over a layer's four GEMMs, bf16 / tinygemm / our Triton kernel / dequantize + cuBLAS:
M=1 127 / 73 / 123 / 356; M=16 128 / 292 / 131 / 357; M=32 131 / 535 / 166 / 358; M=256 187 / 4393 / - / 402.
(First version of this script, same arithmetic.) tinygemm wins only at M=1 and loses 2-20x from M=16 on, and its packed layout would be a second copy of the
int4 weight (the point of AWQ is memory), so it is not used.

    python benchmarks/awq_tinygemm_probe.py      # ~1 min on an H200; writes $OUT/awq_tinygemm_probe.json
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pagedserve.model.awq_format import dequantize, rtn_quantize, to_kstrided, unpack_int4  # noqa: E402
from pagedserve.model.triton_quant import awq_linear, awq_linear_dense  # noqa: E402

SHAPES = {"qkv": (3584, 4608), "o": (3584, 3584), "gate_up": (3584, 37888), "down": (18944, 3584)}  # (K, N)
MS = (1, 16, 32, 64, 128, 256, 512)
GROUP = 128


def bench(fn) -> float:
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=10, return_mode="median") * 1e3


def tinygemm_of(qw: torch.Tensor, qz: torch.Tensor, sc: torch.Tensor, dev: torch.device):
    """x -> x @ W^T through tinygemm for an AWQ checkpoint-layout weight: w = (q - 8) s + (8 - z) s."""
    q = unpack_int4(qw).t().contiguous()  # [N, K] in 0..15
    packed = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).to(dev)
    b = torch._convert_weight_to_int4pack(packed, 8)
    s, z = sc.float(), unpack_int4(qz).float()  # [K/G, N]
    sz = torch.stack([s, (8 - z) * s], -1).to(torch.bfloat16).to(dev).contiguous()  # [K/G, N, 2]
    return lambda x: torch._weight_int4pack_mm(x, b, GROUP, sz)


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU (tinygemm's int4 kernel is CUDA-only here)")
        return 1
    dev = torch.device("cuda")
    rows = []
    for name, (k, n) in SHAPES.items():
        qw, qz, sc = rtn_quantize(torch.randn(n, k) * 0.02, GROUP)  # checkpoint layout
        ref_w = dequantize(qw, qz, sc).float().to(dev)
        tg = tinygemm_of(qw, qz, sc, dev)
        wb = ref_w.to(torch.bfloat16)
        ks = tuple(t.to(dev) for t in to_kstrided(qw, qz)) + (sc.to(dev, torch.bfloat16),)
        for m in MS:
            x = (torch.randn(m, k, device=dev) * 0.5).to(torch.bfloat16)
            want = F.linear(x.float(), ref_w)
            r = {"shape": name, "m": m, "bf16": bench(lambda: F.linear(x, wb))}
            r["tinygemm_err"] = ((tg(x).float() - want).abs().max() / want.abs().max()).item()
            r["tinygemm"] = bench(lambda: tg(x))
            if m < 128:
                r["awq_triton"] = bench(lambda: awq_linear(x, *ks))
            r["awq_dense"] = bench(lambda: awq_linear_dense(x, *ks))
            rows.append(r)
            print(json.dumps(r), flush=True)
        del tg, wb, ref_w
        torch.cuda.empty_cache()
    for m in MS:
        rs = [r for r in rows if r["m"] == m]
        print(m, {key: round(sum(r[key] for r in rs), 1) for key in ("bf16", "tinygemm", "awq_triton", "awq_dense")
                  if all(key in r for r in rs)})
    out = Path(os.environ.get("OUT", ROOT / "benchmarks/results")) / "awq_tinygemm_probe.json"
    out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
