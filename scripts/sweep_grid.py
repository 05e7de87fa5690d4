"""Decode-kernel tuning sweep: per-call time (CUDA graph over rotating weights) for each tile and grid size.

    python scripts/sweep_grid.py 8192x8192,4096x4096 1,16,64
"""
import sys

import torch

from hf_int4.bench import Shape, time_rotating
from hf_int4.ops import int4_gemm

TILES = [(-1, -1), (128, 128), (256, 64), (128, 64)]

for spec in sys.argv[1].split(","):
    K, N = map(int, spec.split("x"))
    shape = Shape(K, N, 128, torch.float16)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for M in map(int, sys.argv[2].split(",")):
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        row = []
        for tn, tk in TILES:
            for blocks in (sms, 2 * sms):
                try:
                    us = time_rotating(lambda i: int4_gemm(x, shape.packed[i], thread_n=tn, thread_k=tk, sms=blocks),
                                       len(shape.packed))
                    row.append(f"{tn}x{tk}/{blocks}:{us:5.1f}")
                except RuntimeError:
                    row.append(f"{tn}x{tk}/{blocks}:  -  ")
        print(f"{K}x{N} M={M:<3}", " ".join(row), flush=True)
