"""Python wrappers of the CUDA ops (torch.ops.hf_int4.*) and their fake implementations.

`int4_gemm(x, packed, bias)` is the entry point: x [..., K] (fp16 / bf16, CUDA) times the packed int4
weight -> [..., N]. It works eagerly, under torch.compile(fullgraph=True) and inside CUDA graphs.

The lock workspace of the kernel (one zeroed int32 buffer per (device, stream), which every kernel
leaves zero again) is cached by the C++ op itself: passing `workspace=None` makes the op look up the
buffer of the *current* stream at run time. Keeping the cache on the C++ side means compiled graphs and
CUDA-graph captures on side streams use the right buffer without any Python state being traced, and a
buffer first created during a capture is zeroed correctly both in the graph and outside it.
"""
from __future__ import annotations

from typing import Optional

import torch

from hf_int4._extension import extension_available
from hf_int4.packing import SUPPORTED_DTYPES, PackedInt4Weight


_HAS_EXTENSION = extension_available()  # a constant, so that torch.compile does not trace the lru_cache


def _packed_shape(size_k: int, size_n: int):
    return PackedInt4Weight.shapes(size_k, size_n, -1)["qweight"]


def _fail(msg: str):
    raise ValueError(f"hf_int4.int4_gemm: {msg}")


def int4_gemm(
    x: torch.Tensor,
    packed: PackedInt4Weight,
    bias: Optional[torch.Tensor] = None,
    *,
    thread_n: int = -1,
    thread_k: int = -1,
    sms: int = -1,
) -> torch.Tensor:
    """x [..., K] @ dequant(packed) [K, N] (+ bias) -> [..., N] in x's dtype.

    thread_n / thread_k (tile: 128x128, 256x64 or 128x64) and sms (number of thread blocks) override the
    kernel's heuristics; they are for tuning and tests."""
    if not _HAS_EXTENSION:
        raise RuntimeError("hf_int4.int4_gemm needs the CUDA extension hf_int4._C, which is not built")
    K, N = packed.in_features, packed.out_features
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"hf_int4.int4_gemm: x must be a tensor, got {type(x).__name__}")
    if x.device.type != "cuda":
        _fail(f"x must be a CUDA tensor, got device {x.device}")
    if packed.qweight.device != x.device:
        _fail(f"the packed weight is on {packed.qweight.device} but x is on {x.device}")
    if x.dtype not in SUPPORTED_DTYPES:
        _fail(f"x must be float16 or bfloat16, got {x.dtype}")
    if x.dtype != packed.dtype:
        _fail(f"x is {x.dtype} but the weight was packed for {packed.dtype} activations (scales dtype)")
    if x.dim() < 1 or x.shape[-1] != K:
        _fail(f"expected x of shape [..., {K}] (in_features), got {tuple(x.shape)}")
    if bias is not None:
        if bias.device != x.device or bias.dtype != x.dtype or tuple(bias.shape) != (N,):
            _fail(f"bias must be a {x.dtype} tensor of shape ({N},) on {x.device}, got {bias.dtype} "
                  f"{tuple(bias.shape)} on {bias.device}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if packed.perm is not None:
        x2 = x2.index_select(1, packed.perm)  # act-order: packed row i is GPTQ row perm[i]
    out = torch.ops.hf_int4.int4_gemm(
        x2, packed.qweight, packed.scales, packed.zeros, None, N, K, packed.group_size, bias, thread_n, thread_k, sms
    )
    return out.reshape(*lead, N)


def repack_gptq(qweight: torch.Tensor, perm: Optional[torch.Tensor], size_k: int, size_n: int) -> torch.Tensor:
    """GPTQ qweight int32 [K/8, N] (CUDA) -> packed int32 [K_pad/16, N_pad*2] (see hf_int4.packing)."""
    if not _HAS_EXTENSION:
        raise RuntimeError("hf_int4.repack_gptq needs the CUDA extension hf_int4._C, which is not built")
    return torch.ops.hf_int4.repack_gptq(qweight, perm, size_k, size_n)


# ------------------------------------------------------------------------------------------ fake impls

if _HAS_EXTENSION:

    @torch.library.register_fake("hf_int4::int4_gemm")
    def _int4_gemm_fake(a, b_packed, scales, zeros, workspace, size_n, size_k, group_size, bias,
                        thread_n=-1, thread_k=-1, sms=-1):
        torch._check(a.dim() == 2, lambda: f"hf_int4::int4_gemm: the activation must be 2-D, got {a.dim()}-D")
        torch._check(a.dtype in SUPPORTED_DTYPES, lambda: f"hf_int4::int4_gemm: bad activation dtype {a.dtype}")
        torch._check(a.shape[1] == size_k, lambda: f"hf_int4::int4_gemm: activation K={a.shape[1]} != size_k={size_k}")
        torch._check(scales.dtype == a.dtype, lambda: "hf_int4::int4_gemm: scales dtype != activation dtype")
        torch._check(
            tuple(b_packed.shape) == _packed_shape(size_k, size_n),
            lambda: f"hf_int4::int4_gemm: b_packed shape {tuple(b_packed.shape)} does not match size_k={size_k}, size_n={size_n}",
        )
        return a.new_empty((a.shape[0], size_n))

    @torch.library.register_fake("hf_int4::repack_gptq")
    def _repack_gptq_fake(qweight, perm, size_k, size_n):
        return qweight.new_empty(_packed_shape(size_k, size_n))
