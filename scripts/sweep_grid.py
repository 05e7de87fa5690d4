"""Decode-kernel grid size sweep: per-call time (CUDA graph over rotating weights) for forced block counts."""
import sys

import torch

from hf_int4.bench import Shape, time_rotating
from hf_int4.ops import int4_gemm

for spec in sys.argv[1].split(","):
    K, N = map(int, spec.split("x"))
    shape = Shape(K, N, 128, torch.float16)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for M in map(int, sys.argv[2].split(",")):
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        row = []
        for blocks in (-1, sms, 2 * sms, 3 * sms, 4 * sms):
            us = time_rotating(lambda i: int4_gemm(x, shape.packed[i], sms=blocks), len(shape.packed))
            row.append(f"{blocks:>4}:{us:6.1f}")
        print(f"{K}x{N} M={M:<4}", "  ".join(row), flush=True)
