"""A few small calls of hf_int4's kernels for compute-sanitizer (memcheck, racecheck): the decode GEMM (odd
shapes, and a chain of back-to-back calls), the gated input's silu_mul, the benchmark's read floor and the dequantize kernel of the dequantize-then-cuBLAS path (not
cuBLAS itself: racecheck flags its Hopper GEMMs, whose mbarrier synchronisation it does not model); with
--hopper (memcheck only, for the same reason) also the CUTLASS Hopper kernel.

Also checks the results against the reference, so a run that is clean but wrong still fails.
"""
import sys

import torch

from hf_int4 import dispatch
from hf_int4._extension import hopper_available
from hf_int4.formats import GPTQConfig
from hf_int4.formats.gptq_writer import random_gptq_layer
from hf_int4.ops import READ_FLOOR_THREADS, dequantize, int4_gemm, read_floor, silu_mul
from hf_int4.packing import pack_gptq_layer
from hf_int4.reference import dequantize_gptq, gptq_matmul_reference

CASES = [  # (K, N, M, config, dtype)
    (576, 1536, 1, GPTQConfig(group_size=128), torch.float16),
    (1000, 200, 5, GPTQConfig(group_size=32, sym=False, checkpoint_format="gptq_v2"), torch.float16),  # k-splits
    (576, 1536, 17, GPTQConfig(group_size=128, sym=False, checkpoint_format="gptq_v2"), torch.bfloat16),
    (1024, 264, 65, GPTQConfig(group_size=32, sym=False, desc_act=True), torch.float16),
    (2048, 2048, 129, GPTQConfig(group_size=-1), torch.bfloat16),
    (1024, 1536, 96, GPTQConfig(group_size=128), torch.float16),  # every Hopper configuration, split-K sums too
    # the Hopper configurations built with zero points, split-K sums too
    (1024, 1536, 40, GPTQConfig(group_size=128, sym=False, desc_act=True, checkpoint_format="gptq_v2"), torch.bfloat16),
    # on a 132-SM GPU the streaming kernel's 16-warp grid: 100 column tiles of 4 atoms, then 100 of 2
    (1000, 6296, 3, GPTQConfig(group_size=64, sym=False, checkpoint_format="gptq_v2"), torch.bfloat16),
    (1000, 3128, 8, GPTQConfig(group_size=128), torch.float16),
    # more 64-column tiles than SMs: 16-warp CTAs of two groups of warps (99 tiles of 128 columns), then of four
    (1000, 12632, 8, GPTQConfig(group_size=128), torch.float16),
    (1000, 25304, 3, GPTQConfig(group_size=64, sym=False, checkpoint_format="gptq_v2"), torch.bfloat16),
    # 48-column tiles where 64-column ones fill the SMs too (128 tiles instead of 96)
    (1000, 6104, 5, GPTQConfig(group_size=128, sym=False, checkpoint_format="gptq_v2"), torch.float16),
]


def main():
    worst = 0.0
    for i, (K, N, M, config, dtype) in enumerate(CASES):
        layer, _ = random_gptq_layer(K, N, config, seed=i, device="cuda", with_bias=True)
        packed = pack_gptq_layer(layer, dtype)
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        bias = layer.bias.to(dtype)
        ref = gptq_matmul_reference(x.float(), layer)
        out = int4_gemm(x, packed, bias)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        perm = packed.perm.long() if packed.perm is not None else torch.arange(K, device="cuda")
        w_ref = dequantize_gptq(layer)[perm].T  # [N, K] in packed row order
        w_err = ((dequantize(packed).float() - w_ref).norm() / w_ref.norm()).item()
        worst = max(worst, err, w_err)
        if "--hopper" in sys.argv and hopper_available():
            spec = dispatch.LinearSpec.of(packed)
            for path in dispatch.PATHS.values():
                if isinstance(path, dispatch.HopperPath) and path.unsupported(spec) is None:
                    h_err = ((path.run(x, packed, bias).float() - ref).norm() / ref.norm()).item()
                    worst = max(worst, h_err)
                    print(f"  {path.name}: rel err {h_err:.2e}")
        if M <= 8:  # the streaming kernel on a gated MLP's gate and up, 8 columns apart, in rows 8 columns longer than both
            up_offset = K + 8
            h = torch.randn(M, up_offset + K + 8, device="cuda", dtype=dtype)
            gate, up = h[:, :K].float(), h[:, up_offset:up_offset + K].float()
            g_ref = gptq_matmul_reference(torch.nn.functional.silu(gate) * up, layer)
            g_err = ((int4_gemm(h, packed, bias, up_offset=up_offset).float() - g_ref).norm() / g_ref.norm()).item()
            worst = max(worst, g_err)
            print(f"  gated: rel err {g_err:.2e}")
        print(f"K={K} N={N} M={M} {config} {dtype}: int4_gemm rel err {err:.2e}, dequantize rel err {w_err:.2e}")
    # back-to-back M = 1 calls, each output the next one's input: launched early behind one another
    # (programmatic dependent launch, decode_gemm.cuh), they share the workspace
    layers = [random_gptq_layer(1024, 1024, GPTQConfig(group_size=128), seed=10 + i, device="cuda")[0] for i in range(3)]
    packs = [pack_gptq_layer(layer, torch.float16) for layer in layers]
    xs = [torch.randn(1, 1024, device="cuda", dtype=torch.float16)]
    for packed in packs:
        xs.append(int4_gemm(xs[-1], packed))
    for i, layer in enumerate(layers):
        ref = gptq_matmul_reference(xs[i].float(), layer)
        err = ((xs[i + 1].float() - ref).norm() / ref.norm()).item()
        worst = max(worst, err)
        print(f"chained call {i}: int4_gemm rel err {err:.2e}")
    # the gated input for more rows (silu_mul): 16-byte vectors, then values one by one (odd columns, odd row stride)
    for rows, size_k, up_offset, width in ((37, 352, 384, 744), (9, 101, 103, 205)):
        h = torch.randn(rows, width + 1, device="cuda", dtype=torch.float16)[:, :width] if size_k % 2 else \
            torch.randn(rows, width, device="cuda", dtype=torch.bfloat16)
        gate, up = h[:, :size_k].float(), h[:, up_offset:up_offset + size_k].float()
        ref = torch.nn.functional.silu(gate) * up
        err = ((silu_mul(h, size_k, up_offset).float() - ref).norm() / ref.norm()).item()
        worst = max(worst, err)
        print(f"silu_mul {rows} x {size_k} of {width}: rel err {err:.2e}")
    # the benchmark's read floor over a packed layer with zeros (three buffers), fewer blocks than one stride needs
    packed = pack_gptq_layer(random_gptq_layer(1000, 200, GPTQConfig(group_size=32, sym=False), seed=20,
                                               device="cuda")[0], torch.float16)
    sink = torch.empty(3 * READ_FLOOR_THREADS, dtype=torch.int32, device="cuda")
    read_floor([packed.qweight, packed.scales, packed.zeros], sink)
    torch.cuda.synchronize()
    assert worst < 2e-2, worst
    print("sanitize_check: ok")


if __name__ == "__main__":
    main()
