"""A gated MLP's down projection three ways, side by side at decode sizes (hf_int4.bench's method: CUDA graphs of many
calls over rotating weight copies, replayed in turn, median per call):

- gemm: the down projection alone, on its input x = silu(gate) * up made beforehand (the floor);
- silu_mul + gemm: silu(gate) * up by a kernel of its own (hf_int4.ops.silu_mul, what more rows get), then the GEMM;
- gated: the GEMM on the fused gate/up output, forming silu(gate) * up as it reads it (hf_int4.ops.int4_gemm up_offset).

    python scripts/bench_gated.py [--shapes 14336x4096,...] [--ms 1,2,4,8] [--json out.json]
"""
import argparse
import json

import torch

from hf_int4.bench import Shape, time_interleaved
from hf_int4.ops import int4_gemm, silu_mul


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="14336x4096,11008x4096,18944x3584", help="KxN of down projections")
    parser.add_argument("--ms", default="1,2,4,8")
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    print(f"{torch.cuda.get_device_name()}: us per call")
    print(f"{'K x N':>12} {'M':>3} {'gemm':>8} {'silu_mul+gemm':>14} {'gated':>8} {'saved':>7}")
    for shape in args.shapes.split(","):
        K, N = map(int, shape.split("x"))
        packed = Shape(K, N, 128, torch.float16).packed  # copies enough to stream from HBM
        for m in map(int, args.ms.split(",")):
            h = torch.randn(m, 2 * K, dtype=torch.float16, device="cuda")
            x = silu_mul(h, K, K)
            times = time_interleaved({
                "gemm": (lambda i: int4_gemm(x, packed[i]), len(packed)),
                "silu_mul+gemm": (lambda i: int4_gemm(silu_mul(h, K, K), packed[i]), len(packed)),
                "gated": (lambda i: int4_gemm(h, packed[i], up_offset=K), len(packed)),
            })
            row = {"k": K, "n": N, "m": m, **{f"{name}_us": t for name, t in times.items()}}
            rows.append(row)
            print(f"{shape:>12} {m:>3} {times['gemm']:>8.2f} {times['silu_mul+gemm']:>14.2f} {times['gated']:>8.2f} "
                  f"{times['silu_mul+gemm'] - times['gated']:>7.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
