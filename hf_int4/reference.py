"""The exact reference: GPTQ dequantization and matmul in fp32 on any device.

It is the CPU fallback of HfInt4Linear and the oracle every kernel test compares against, so it is
written for obviousness, not speed.
"""
from typing import Optional

import torch

from hf_int4.formats.gptq import GPTQFormatError, GPTQLayer


def dequantize_ints(intweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """fp32 [K, N] of unpacked GPTQ tensors: w[k, n] = scales[g, n] * (q[k, n] - zero[g, n]) with g = g_idx[k].

    q - zero is a small exact integer and fp16 -> fp32 is exact, so each element is one correctly
    rounded fp32 multiply: bit-identical to AutoGPTQ / GPTQModel dequantizing in fp32."""
    g = g_idx.long()
    return scales.float()[g] * (intweight - zeros[g]).float()


def dequantize_gptq(layer: GPTQLayer) -> torch.Tensor:
    """fp32 [K, N] of a (packed) GPTQ layer: dequantize_ints of its unpacked integers."""
    return dequantize_ints(layer.int_weight(), layer.int_zeros(), layer.scales, layer.g_idx)


def gptq_matmul_reference(x: torch.Tensor, layer: GPTQLayer, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x[..., K] @ W (+ bias), accumulated in fp32 (float64 for float64 x), returned in x.dtype.

    `weight` is an optional precomputed dequantize_gptq(layer) to avoid dequantizing on every call."""
    K, N = layer.in_features, layer.out_features
    if x.shape[-1] != K:
        raise GPTQFormatError(f"layer {layer.name}: input has {x.shape[-1]} features, the layer expects in_features={K}")
    if weight is None:
        weight = dequantize_gptq(layer)
    elif tuple(weight.shape) != (K, N):
        raise GPTQFormatError(f"layer {layer.name}: precomputed weight has shape {tuple(weight.shape)}, expected ({K}, {N})")
    return matmul_reference(x, weight, layer.bias)


def matmul_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x[..., K] @ weight[K, N] (+ bias) in fp32 (float64 for float64 x), returned in x.dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = x.to(compute) @ weight.to(device=x.device, dtype=compute)
    if bias is not None:
        out = out + bias.to(device=x.device, dtype=compute)
    return out.to(x.dtype)


def dequantize_packed(packed) -> torch.Tensor:
    """fp32 [K, N] of a weight already in the kernel layout (a PackedInt4Weight), in GPTQ row order:
    the same exact formula, scales[g] * (q - zero[g]), for packed checkpoints used on the CPU."""
    from hf_int4.packing import unpack_to_int_weight

    u = unpack_to_int_weight(packed)
    g = u["group"]
    return u["scales"][g] * (u["intweight"] - u["zeros"][g]).float()
