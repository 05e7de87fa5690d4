"""Run one int4_gemm case, or one Hopper configuration, against the float64 oracle from the unpacked GPTQ ints
(kernel debugging; with --repeat, one kernel for a profiler such as ncu).

    python scripts/kernel_case.py K N M [--group-size 128] [--asym] [--act-order] [--bf16] [--tile TNxTK] [--sms S]
                                  [--hopper PATH] [--repeat R]

--hopper names a Hopper path of hf_int4.dispatch.PATHS (e.g. hopper_w256_t16_partials4): its schedule and splits.
"""
import argparse
import sys
from pathlib import Path

import torch

# the tests' oracle (tests/gptq_oracle.py), so that a case is judged here as the tests judge it
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gptq_oracle import oracle  # noqa: E402

from hf_int4.dispatch import PATHS, HopperPath  # noqa: E402
from hf_int4.formats import GPTQConfig  # noqa: E402
from hf_int4.formats.gptq_writer import random_gptq_layer  # noqa: E402
from hf_int4.ops import int4_gemm  # noqa: E402
from hf_int4.packing import pack_gptq_layer  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("K", type=int)
    p.add_argument("N", type=int)
    p.add_argument("M", type=int)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--asym", action="store_true")
    p.add_argument("--act-order", action="store_true")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--tile", default=None)
    p.add_argument("--sms", type=int, default=-1)
    hopper_paths = sorted(name for name, path in PATHS.items() if isinstance(path, HopperPath))
    p.add_argument("--hopper", choices=hopper_paths, default=None, metavar="PATH", help="run this Hopper path instead")
    p.add_argument("--repeat", type=int, default=1, help="launch the kernel this many times")
    a = p.parse_args()
    cfg = GPTQConfig(group_size=a.group_size, sym=not a.asym, desc_act=a.act_order)
    dtype = torch.bfloat16 if a.bf16 else torch.float16
    layer, raw = random_gptq_layer(a.K, a.N, cfg, seed=1, device="cuda")
    packed = pack_gptq_layer(layer, dtype)
    x = torch.randn(a.M, a.K, device="cuda", dtype=dtype)
    tn, tk = map(int, a.tile.split("x")) if a.tile else (-1, -1)
    for _ in range(a.repeat):
        if a.hopper is None:
            out = int4_gemm(x, packed, thread_n=tn, thread_k=tk, sms=a.sms)
        else:
            out = PATHS[a.hopper].run(x, packed, None)
    torch.cuda.synchronize()
    ref = oracle(raw, x)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    bad_rows = ((out.double() - ref).abs().amax(1) > 0.05 * ref.abs().amax()).nonzero().flatten().tolist()
    print(f"K={a.K} N={a.N} M={a.M} {cfg} {dtype} tile={a.tile} sms={a.sms} hopper={a.hopper}: rel err {err:.3e} bad rows {bad_rows[:10]}{'...' if len(bad_rows) > 10 else ''}")


if __name__ == "__main__":
    main()
