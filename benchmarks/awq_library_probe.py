#!/usr/bin/env python
"""GPU probe: int4 GEMMs from well-kept libraries against our AWQ paths and bf16 cuBLAS, on the 7B
projections, M = 1..512, CUDA-graph replays (median us; one weight, so L2-warm for the small ones).

Asked because AWQ stays below bf16 from 32 rows on (README, Quantization), and a library kernel would be
preferred to a hand-written one. Candidates:
* torch's tinygemm, `torch._weight_int4pack_mm` (in every CUDA torch);
* FBGEMM GenAI's CUTLASS mixed-input GEMMs (Hopper), `torch.ops.fbgemm.bf16i4bf16_shuffled` (weights
  pre-shuffled, Machete-like) and `bf16i4bf16_rowwise`, when `fbgemm_gpu` imports. Not a dependency: for a
  probe, carry the wheel matching the GPU machine's torch (fbgemm-gpu-genai 1.6.0 for torch 2.11, cp312,
  35 MB) and `pip install --no-deps --target DIR`, then put DIR on PYTHONPATH.
Both take the AWQ form exactly up to one rounding: w = (q - z) s = (q - 8) s + (8 - z) s, the second term
their per-group "zero". FBGEMM's candidates quantize the bf16 weight with their own helper (same scheme).

Results on an H200, us summed over a layer's four GEMMs (bf16 / tinygemm / FBGEMM shuffled / ours):
M=1 127 / 73 / 152 / 123; M=32 131 / 535 / 154 / 147-166; M=64 131 / 1059 / 164 / 221-255;
M=256 187-189 / 4393 / 249 / 402; M=512 338-354 / 9174 / 415 / 550-556
(results/awq_tinygemm_probe_h200.json and results/awq_fbgemm_probe_h200.json, from this script's
first two versions, one library each, in two leases). No int4 kernel reaches bf16 from 32 rows on;
tinygemm wins only at M=1, and FBGEMM's CUTLASS kernels beat our dense large-M path by 1.3-1.9x but
stay 1.2-1.3x behind bf16.

    python benchmarks/awq_library_probe.py      # ~1 min on an H200; writes $OUT/awq_library_probe.json
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

from pagedserve.quantization.awq_format import dequantize, rtn_quantize, to_kstrided, unpack_int4  # noqa: E402
from pagedserve.quantization.dispatch import dense_from_m  # noqa: E402
from pagedserve.quantization.triton_quant import awq_linear, awq_linear_dense  # noqa: E402

MS = (1, 16, 32, 64, 128, 256, 512)
GROUP = 128


def tinygemm_of(qw: torch.Tensor, qz: torch.Tensor, sc: torch.Tensor, dev: torch.device):
    """x -> x @ W^T through tinygemm for an AWQ checkpoint-layout weight: w = (q - 8) s + (8 - z) s."""
    q = unpack_int4(qw).t().contiguous()  # [N, K] in 0..15
    packed = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).to(dev)
    b = torch._convert_weight_to_int4pack(packed, 8)
    s, z = sc.float(), unpack_int4(qz).float()  # [K/G, N]
    sz = torch.stack([s, (8 - z) * s], -1).to(torch.bfloat16).to(dev).contiguous()  # [K/G, N, 2]
    return lambda x: torch._weight_int4pack_mm(x, b, GROUP, sz)


def fbgemm_of(w: torch.Tensor) -> dict:
    """FBGEMM's W4A16 GEMMs for a bf16 weight [N, K] (its own quantizer), or {} without fbgemm_gpu."""
    try:
        import fbgemm_gpu.experimental.gen_ai  # noqa: F401  (registers torch.ops.fbgemm.*)
        from fbgemm_gpu.experimental.gen_ai.quantize import int4_row_quantize_zp, pack_int4, quantize_int4_preshuffle
    except Exception as e:  # noqa: BLE001 - any import failure: the peer library is not here
        print(f"fbgemm_gpu not available: {type(e).__name__}: {str(e)[:120]}")
        return {}
    wq, (gs, gz) = quantize_int4_preshuffle(w, dtype="bf16")
    wr, sr, zr = int4_row_quantize_zp(w, GROUP)
    wr, sr, zr = pack_int4(wr), sr.to(torch.bfloat16), zr.to(torch.bfloat16)
    return {"fbgemm_shuffled": lambda x: torch.ops.fbgemm.bf16i4bf16_shuffled(x, wq, gs, gz),
            "fbgemm_rowwise": lambda x: torch.ops.fbgemm.bf16i4bf16_rowwise(x, wr, sr, zr)}


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU (the library kernels probed are CUDA-only)")
        return 1
    from quant_tile_sweep import bench, shapes  # the same projections and CUDA-graph timing as the tile sweep

    dev = torch.device("cuda")
    rows = []
    for name, (k, n) in shapes(False).items():
        wb = (torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16)
        qw, qz, sc = rtn_quantize(wb.float().cpu(), GROUP)  # checkpoint layout
        ref_w = dequantize(qw, qz, sc).float().to(dev)
        ks = tuple(t.to(dev) for t in to_kstrided(qw, qz)) + (sc.to(dev, torch.bfloat16),)
        kernels = {"tinygemm": tinygemm_of(qw, qz, sc, dev), **fbgemm_of(wb)}
        for m in MS:
            x = (torch.randn(m, k, device=dev) * 0.5).to(torch.bfloat16)
            want = F.linear(x.float(), ref_w)
            ours = awq_linear if m < dense_from_m("awq", n, k) else awq_linear_dense
            r = {"shape": name, "m": m, "bf16": bench(lambda: F.linear(x, wb), True),
                 "ours": bench(lambda: ours(x, *ks), True)}
            for label, fn in kernels.items():
                r[label + "_rel_err"] = ((fn(x).float() - want).norm() / want.norm()).item()  # vs the AWQ weight
                r[label] = bench(lambda fn=fn: fn(x), True)
            rows.append(r)
            print(json.dumps(r), flush=True)
        del kernels, wb, ref_w
        torch.cuda.empty_cache()
    keys = [key for key in rows[0] if key not in ("shape", "m") and not key.endswith("_err")]
    for m in MS:
        rs = [r for r in rows if r["m"] == m]
        print(f"M={m:<4}", {key: round(sum(r[key] for r in rs), 1) for key in keys})
    out = Path(os.environ.get("OUT", ROOT / "benchmarks/results")) / "awq_library_probe.json"
    out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
