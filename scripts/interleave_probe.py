"""Does the set of kernels timed alongside change two paths' times? (docs/kernel_notes.md step 31)

    python scripts/interleave_probe.py [--shapes 8192x8192,4096x4096] [--m 2048] [--rounds 2]
                                       [--paths hopper_wide,hopper_wide_cluster] [--json out.json]

For each shape, times the two paths with hf_int4.bench's method (CUDA-graph replays over rotating weights, paths
interleaved) inside three sets: every runnable hf_int4 path (as `hf-int4 tune` times them), the Hopper tiles alone,
and every path plus fp16 cuBLAS and the read floor (as `python -m hf_int4.bench` does); prints one line per set and
round. Needs a GPU."""
import argparse
import json

import torch

from hf_int4 import bench

HOPPER_TILES = ["hopper_wide", "hopper_wide_cluster", "hopper_192", "hopper_160"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="8192x8192,4096x4096")
    p.add_argument("--m", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--paths", default="hopper_wide,hopper_wide_cluster", help="the two paths compared")
    p.add_argument("--json")
    a = p.parse_args()
    first, second = a.paths.split(",")
    lines = []
    for spec in a.shapes.split(","):
        K, N = map(int, spec.split("x"))
        shape = bench.Shape(K, N, 128, torch.float16)
        every = shape.runnable_paths()
        sets = {"tune_set": every, "core": sorted(set(HOPPER_TILES) | {first, second}), "bench_set": ["fp16", "read"] + every}
        for rep in range(a.rounds):
            for label, paths in sets.items():
                r = shape.time_paths(a.m, paths)
                t1, t2 = r[f"{first}_us"], r[f"{second}_us"]
                line = dict(K=K, N=N, M=a.m, rep=rep, set=label, first=round(t1, 1), second=round(t2, 1),
                            first_over_second=round(t1 / t2, 3), fp16=round(r.get("fp16_us", 0), 1))
                print(line, flush=True)
                lines.append(line)
        del shape
        torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(lines, f, indent=1)


if __name__ == "__main__":
    main()
