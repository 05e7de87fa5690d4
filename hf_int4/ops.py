"""Python wrappers of the CUDA ops (torch.ops.hf_int4.*) and their fake implementations.

Two linear paths over the same packed weight, x [..., K] (fp16 / bf16, CUDA) -> [..., N]: `int4_gemm`
(the decode kernel) and `dequant_linear` (dequantize into a temporary, then cuBLAS). hf_int4.dispatch
picks between them per call. Both work eagerly, under torch.compile(fullgraph=True) and in CUDA graphs.

The lock workspace of the kernel (one zeroed int32 buffer per (device, stream), which every kernel
leaves zero again) is cached by the C++ op itself: passing `workspace=None` makes the op look up the
buffer of the *current* stream at run time. Keeping the cache on the C++ side means compiled graphs and
CUDA-graph captures on side streams use the right buffer without any Python state being traced, and a
buffer first created during a capture is zeroed correctly both in the graph and outside it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from hf_int4._extension import extension_available, hopper_available
from hf_int4.packing import SUPPORTED_DTYPES, PackedInt4Weight


_HAS_EXTENSION = extension_available()  # constants, so that torch.compile does not trace the lru_cache
_HAS_HOPPER = hopper_available()


def _packed_shape(size_k: int, size_n: int):
    return PackedInt4Weight.shapes(size_k, size_n, -1)["qweight"]


def _holds_gate_and_up(h: torch.Tensor, size_k: int, up_offset: int) -> bool:
    """Whether h [..., width] holds a gated MLP's gate in columns [0, size_k) and its up projection in
    [up_offset, up_offset + size_k), apart (what silu_mul and a gated int4_gemm read; the CUDA ops check the same)."""
    return h.dim() >= 1 and 0 < size_k <= up_offset and h.shape[-1] >= up_offset + size_k


def _check_call(op: str, x: torch.Tensor, packed: PackedInt4Weight, bias: Optional[torch.Tensor], up_offset: int = 0):
    """The checks every linear path makes on its inputs, with errors naming the offending setting (up_offset > 0: x is
    a gated input, see silu_mul)."""
    def fail(msg):
        raise ValueError(f"hf_int4.{op}: {msg}")

    if not _HAS_EXTENSION:
        raise RuntimeError(f"hf_int4.{op} needs the CUDA extension hf_int4._C, which is not built")
    K, N = packed.in_features, packed.out_features
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"hf_int4.{op}: x must be a tensor, got {type(x).__name__}")
    if x.device.type != "cuda":
        fail(f"x must be a CUDA tensor, got device {x.device}")
    if packed.qweight.device != x.device:
        fail(f"the packed weight is on {packed.qweight.device} but x is on {x.device}")
    if x.dtype not in SUPPORTED_DTYPES:
        fail(f"x must be float16 or bfloat16, got {x.dtype}")
    if x.dtype != packed.dtype:
        fail(f"x is {x.dtype} but the weight was packed for {packed.dtype} activations (scales dtype)")
    if up_offset > 0:
        if not _holds_gate_and_up(x, K, up_offset):
            fail(f"a gated input holds the gate in columns [0, {K}) and the up projection in [up_offset, up_offset + "
                 f"{K}), up_offset >= {K}; got up_offset={up_offset} and x of shape {tuple(x.shape)}")
    elif x.dim() < 1 or x.shape[-1] != K:
        fail(f"expected x of shape [..., {K}] (in_features), got {tuple(x.shape)}")
    if bias is not None:
        if bias.device != x.device or bias.dtype != x.dtype or tuple(bias.shape) != (N,):
            fail(f"bias must be a {x.dtype} tensor of shape ({N},) on {x.device}, got {bias.dtype} "
                 f"{tuple(bias.shape)} on {bias.device}")


def _in_packed_order(x: torch.Tensor, packed: PackedInt4Weight) -> torch.Tensor:
    """x [..., K] with its columns in the packed row order (act-order: packed row i is GPTQ row perm[i]). The ops
    take any leading dimensions: no reshapes here (each costs about a microsecond of host time per call)."""
    return x if packed.perm is None else x.index_select(-1, packed.perm)


GATED_MAX_ROWS = 8  # the streaming kernel's rows (csrc/kernels.h kStreamMaxRows): it takes a gated input


def silu_mul(h: torch.Tensor, size_k: int, up_offset: int) -> torch.Tensor:
    """A gated MLP's input to its down projection, silu(h[..., :size_k]) * h[..., up_offset:up_offset + size_k]. On the
    GPU one kernel reads both slices where they lie and forms it as the streaming kernel forms a gated input (so the
    bits do not depend on M); torch's silu and multiply would make two passes, and a prefill's gate/up output is the
    largest activation of the model. Elsewhere (the CPU reference path) as the model's own MLP computes it."""
    if not _holds_gate_and_up(h, size_k, up_offset):
        raise ValueError(f"hf_int4.silu_mul: h of shape {tuple(h.shape)} does not hold size_k={size_k} columns at 0 "
                         f"and at up_offset={up_offset} without overlap")
    if h.is_cuda and _HAS_EXTENSION:
        return _SiluMul.apply(h, size_k, up_offset) if _needs_grad(h) else torch.ops.hf_int4.silu_mul(h, size_k, up_offset)
    return F.silu(h[..., :size_k]) * h[..., up_offset:up_offset + size_k]


def int4_gemm(
    x: torch.Tensor,
    packed: PackedInt4Weight,
    bias: Optional[torch.Tensor] = None,
    *,
    thread_n: int = -1,
    thread_k: int = -1,
    sms: int = -1,
    up_offset: int = 0,
) -> torch.Tensor:
    """The decode kernel: x [..., K] @ dequant(packed) [K, N] (+ bias) -> [..., N] in x's dtype.

    Up to 8 rows run the streaming kernel, more rows the tiled kernel. thread_n / thread_k (the tiled kernel's
    tile: 128x128, 256x64 or 128x64) and sms (its number of thread blocks; for up to 8 rows, the streaming
    kernel's number of k-splits) override the heuristics; they are for tuning and tests.
    up_offset > 0: x is a gated MLP's gate and up projections side by side, and the GEMM's input is
    silu_mul(x, K, up_offset), which the streaming kernel (up to GATED_MAX_ROWS rows) forms as it reads x, with no
    kernel in between; more rows and act-order layers form it first."""
    _check_call("int4_gemm", x, packed, bias, up_offset)
    K, N = packed.in_features, packed.out_features
    if up_offset > 0 and (packed.perm is not None or x.numel() > GATED_MAX_ROWS * x.shape[-1]):
        x, up_offset = silu_mul(x, K, up_offset), 0
    a = _in_packed_order(x, packed)
    if _needs_grad(a, bias):
        return _Int4Gemm.apply(a, packed.qweight, packed.scales, packed.zeros, N, K, packed.group_size, bias, thread_n,
                               thread_k, sms, up_offset)
    return torch.ops.hf_int4.int4_gemm(
        a, packed.qweight, packed.scales, packed.zeros, None, N, K, packed.group_size, bias, thread_n, thread_k, sms,
        up_offset,
    )


def dequantize(packed: PackedInt4Weight) -> torch.Tensor:
    """The packed weight as W^T [N, K] in its activation dtype, K in packed order (a CUDA kernel)."""
    if not _HAS_EXTENSION:
        raise RuntimeError("hf_int4.dequantize needs the CUDA extension hf_int4._C, which is not built")
    return torch.ops.hf_int4.dequantize_int4(
        packed.qweight, packed.scales, packed.zeros, packed.out_features, packed.in_features, packed.group_size
    )


def dequant_linear(x: torch.Tensor, packed: PackedInt4Weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dequantize-then-cuBLAS: same result as int4_gemm up to fp32 summation order.

    The [N, K] weight is a temporary from torch's caching allocator: freed as soon as the GEMM is queued,
    its block is reused by the next layer on the same stream (so one largest-layer buffer per device in
    steady state), CUDA-graph captures take it from the graph's private pool, and other streams get their
    own blocks, so several streams never share one buffer."""
    _check_call("dequant_linear", x, packed, bias)
    return F.linear(_in_packed_order(x, packed), dequantize(packed), bias)


def hopper_linear(x: torch.Tensor, packed: PackedInt4Weight, bias: Optional[torch.Tensor] = None,
                  schedule: int = 0, splits: int = 0) -> torch.Tensor:
    """The Hopper kernel (CUTLASS, TMA + wgmma): N % 128 == 0, K % 64 == 0, groups >= 64; asymmetric weights (zero
    points) only with the schedules built for them (hf_int4.dispatch.ZERO_POINT_SCHEDULES).

    schedule: which configuration (tile shape, cluster, split-K into fp32 partials or not), an index into the list
    in hf_int4/csrc/hopper/hopper_schedules.cuh (hf_int4.dispatch.PATHS names each). splits: 0, except for the
    partial-sum schedules (hf_int4.dispatch.PARTIAL_SUM_SCHEDULES): 2..16 K-slices of whole 64-row tiles and groups,
    summed in K order. All deterministic.
    hf_int4.dispatch.HopperPath says which layers it takes; this checks again and raises otherwise."""
    _check_call("hopper_linear", x, packed, bias)
    if not _HAS_HOPPER:
        raise RuntimeError("hf_int4.hopper_linear needs hf_int4._hopper (built for sm_90a with the CUTLASS headers)")
    a = _in_packed_order(x, packed)
    gemm = _HopperGemm.apply if _needs_grad(a, bias) else torch.ops.hf_int4.hopper_int4_gemm
    return gemm(a, packed.qweight, packed.scales, packed.zeros, bias, packed.out_features, packed.in_features,
                packed.group_size, schedule, splits)


def repack_gptq(qweight: torch.Tensor, perm: Optional[torch.Tensor], size_k: int, size_n: int) -> torch.Tensor:
    """GPTQ qweight int32 [K/8, N] (CUDA) -> packed int32 [K_pad/16, N_pad*2] (see hf_int4.packing)."""
    if not _HAS_EXTENSION:
        raise RuntimeError("hf_int4.repack_gptq needs the CUDA extension hf_int4._C, which is not built")
    return torch.ops.hf_int4.repack_gptq(qweight, perm, size_k, size_n)


READ_FLOOR_THREADS = 512  # threads per block of csrc/read_floor.cuh
READ_FLOOR_TIMED_KEY = 0x12345678  # read_floor's default key: an xor a thread is unlikely to meet


def read_floor(buffers, sink: torch.Tensor, key: int = READ_FLOOR_TIMED_KEY) -> None:
    """The benchmark's floor: reads every byte of one to three CUDA buffers (contiguous, 16-byte aligned, whole
    16-byte words; e.g. a packed layer's qweight, scales, zeros) and nothing else, one thread per entry of sink (int32,
    a multiple of READ_FLOOR_THREADS entries: one block per that many). Thread g stores the xor of the 32-bit words it
    read to sink[g] only if that equals key (a signed 32-bit value): timed runs store nothing, tests pass a thread's
    expected xor."""
    if not _HAS_EXTENSION:
        raise RuntimeError("hf_int4.read_floor needs the CUDA extension hf_int4._C, which is not built")
    torch.ops.hf_int4.read_floor(list(buffers), sink, key)


# ---------------------------------------------------------------------------------------- backward

# The weights are frozen buffers: the ops' gradients are those of their activations (and of a bias that requires one),
# so that adapters trained on top (LoRA) get theirs through every quantized layer. The weight is dequantized into a
# temporary for each backward call (W^T [N, K] in packed row order, the order the ops' activations are in). Only calls
# whose inputs autograd follows go through these Functions: an autograd kernel on the ops themselves would cost every
# eager call a round trip through Python (a decode step makes ~130 of them).


def _needs_grad(a: torch.Tensor, bias: Optional[torch.Tensor] = None) -> bool:
    return torch.is_grad_enabled() and (a.requires_grad or (bias is not None and bias.requires_grad))


def _silu_mul_backward(h: torch.Tensor, grad_in: torch.Tensor, size_k: int, up_offset: int) -> torch.Tensor:
    """d(silu(gate) * up)/dh for h = [gate .. up ..], given the gradient of silu(gate) * up; in float32."""
    gate, up = h[..., :size_k].float(), h[..., up_offset:up_offset + size_k].float()
    sig, g = torch.sigmoid(gate), grad_in.float()
    grad = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    grad[..., :size_k] = g * up * sig * (1 + gate * (1 - sig))  # silu'(x) = s (1 + x (1 - s))
    grad[..., up_offset:up_offset + size_k] = g * gate * sig
    return grad.to(h.dtype)


def _save_gemm(ctx, a, b_packed, scales, zeros, size_n, size_k, group_size, up_offset):
    ctx.save_for_backward(a if up_offset > 0 else None, b_packed, scales, zeros)
    ctx.shape = size_n, size_k, group_size, up_offset


def _gemm_backward(ctx, grad, a_needs_grad: bool, bias_needs_grad: bool):
    """(d a, d bias) of a GEMM saved by _save_gemm."""
    a, b_packed, scales, zeros = ctx.saved_tensors
    size_n, size_k, group_size, up_offset = ctx.shape
    grad_a = grad_bias = None
    if a_needs_grad:
        weight_t = torch.ops.hf_int4.dequantize_int4(b_packed, scales, zeros, size_n, size_k, group_size)
        grad_a = grad.to(weight_t.dtype) @ weight_t
        if up_offset > 0:
            grad_a = _silu_mul_backward(a, grad_a, size_k, up_offset)
    if bias_needs_grad:
        grad_bias = grad.reshape(-1, size_n).sum(0)
    return grad_a, grad_bias


class _Int4Gemm(torch.autograd.Function):
    """torch.ops.hf_int4.int4_gemm with the gradients of its activations and bias."""

    @staticmethod
    def forward(ctx, a, b_packed, scales, zeros, size_n, size_k, group_size, bias, thread_n, thread_k, sms, up_offset):
        _save_gemm(ctx, a, b_packed, scales, zeros, size_n, size_k, group_size, up_offset)
        return torch.ops.hf_int4.int4_gemm(a, b_packed, scales, zeros, None, size_n, size_k, group_size, bias,
                                           thread_n, thread_k, sms, up_offset)

    @staticmethod
    def backward(ctx, grad):
        grad_a, grad_bias = _gemm_backward(ctx, grad, ctx.needs_input_grad[0], ctx.needs_input_grad[7])
        return grad_a, None, None, None, None, None, None, grad_bias, None, None, None, None


class _HopperGemm(torch.autograd.Function):
    """torch.ops.hf_int4.hopper_int4_gemm with the gradients of its activations and bias."""

    @staticmethod
    def forward(ctx, a, b_packed, scales, zeros, bias, size_n, size_k, group_size, schedule, splits):
        _save_gemm(ctx, a, b_packed, scales, zeros, size_n, size_k, group_size, 0)
        return torch.ops.hf_int4.hopper_int4_gemm(a, b_packed, scales, zeros, bias, size_n, size_k, group_size,
                                                  schedule, splits)

    @staticmethod
    def backward(ctx, grad):
        grad_a, grad_bias = _gemm_backward(ctx, grad, ctx.needs_input_grad[0], ctx.needs_input_grad[4])
        return grad_a, None, None, None, grad_bias, None, None, None, None, None


class _SiluMul(torch.autograd.Function):
    """torch.ops.hf_int4.silu_mul with the gradient of its input."""

    @staticmethod
    def forward(ctx, h, size_k, up_offset):
        ctx.save_for_backward(h)
        ctx.size_k, ctx.up_offset = size_k, up_offset
        return torch.ops.hf_int4.silu_mul(h, size_k, up_offset)

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        return _silu_mul_backward(h, grad, ctx.size_k, ctx.up_offset), None, None


# ------------------------------------------------------------------------------------------ fake impls

if _HAS_EXTENSION:

    @torch.library.register_fake("hf_int4::int4_gemm")
    def _int4_gemm_fake(a, b_packed, scales, zeros, workspace, size_n, size_k, group_size, bias,
                        thread_n=-1, thread_k=-1, sms=-1, up_offset=0):
        torch._check(a.dim() >= 1, lambda: "hf_int4::int4_gemm: the activation must be [..., K]")
        torch._check(a.dtype in SUPPORTED_DTYPES, lambda: f"hf_int4::int4_gemm: bad activation dtype {a.dtype}")
        if up_offset > 0:
            torch._check(_holds_gate_and_up(a, size_k, up_offset),
                         lambda: f"hf_int4::int4_gemm: a gated input of {a.shape[-1]} columns, up_offset={up_offset}")
            torch._check(a.numel() <= GATED_MAX_ROWS * a.shape[-1],
                         lambda: f"hf_int4::int4_gemm: a gated input takes at most {GATED_MAX_ROWS} rows")
        else:
            torch._check(a.shape[-1] == size_k, lambda: f"hf_int4::int4_gemm: activation K={a.shape[-1]} != size_k={size_k}")
        torch._check(scales.dtype == a.dtype, lambda: "hf_int4::int4_gemm: scales dtype != activation dtype")
        torch._check(
            tuple(b_packed.shape) == _packed_shape(size_k, size_n),
            lambda: f"hf_int4::int4_gemm: b_packed shape {tuple(b_packed.shape)} does not match size_k={size_k}, size_n={size_n}",
        )
        return a.new_empty((*a.shape[:-1], size_n))

    @torch.library.register_fake("hf_int4::dequantize_int4")
    def _dequantize_int4_fake(b_packed, scales, zeros, size_n, size_k, group_size):
        torch._check(
            tuple(b_packed.shape) == _packed_shape(size_k, size_n),
            lambda: f"hf_int4::dequantize_int4: b_packed shape {tuple(b_packed.shape)} does not match size_k={size_k}, size_n={size_n}",
        )
        return scales.new_empty((size_n, size_k))

    if _HAS_HOPPER:

        @torch.library.register_fake("hf_int4::hopper_int4_gemm")
        def _hopper_int4_gemm_fake(a, b_packed, scales, zeros, bias, size_n, size_k, group_size, schedule=0,
                                   splits=0):
            torch._check(a.dim() >= 1 and a.shape[-1] == size_k,
                         lambda: f"hf_int4::hopper_int4_gemm: the activation must be [..., K={size_k}]")
            return a.new_empty((*a.shape[:-1], size_n))

    @torch.library.register_fake("hf_int4::silu_mul")
    def _silu_mul_fake(h, size_k, up_offset):
        torch._check(_holds_gate_and_up(h, size_k, up_offset),
                     lambda: f"hf_int4::silu_mul: h of shape {tuple(h.shape)} does not hold size_k={size_k} columns "
                             f"at 0 and at up_offset={up_offset}")
        return h.new_empty(h.shape[:-1] + (size_k,))

    @torch.library.register_fake("hf_int4::read_floor")
    def _read_floor_fake(buffers, sink, key):
        return None

    @torch.library.register_fake("hf_int4::repack_gptq")
    def _repack_gptq_fake(qweight, perm, size_k, size_n):
        return qweight.new_empty(_packed_shape(size_k, size_n))
