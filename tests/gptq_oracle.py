"""The tests' oracle: the weight that unpacked GPTQ integers stand for, computed here from its definition

    W [K, N] = scales[g_idx] * (intweight - zeros[g_idx])

on the raw integers the fixture writer returns (hf_int4.formats.gptq_writer.random_gptq_layer), never from packed
tensors, and the float64 product of an input with it. Shared by the CPU and GPU tests and scripts/kernel_case.py."""
import torch


def weight_from_ints(raw: dict, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = raw["g_idx"].long()
    return raw["scales"].to(dtype)[g] * (raw["intweight"] - raw["zeros"][g]).to(dtype)


def oracle(raw: dict, x: torch.Tensor, bias=None) -> torch.Tensor:
    """x [..., K] @ W (+ bias) in float64."""
    W = weight_from_ints(raw)
    ref = x.reshape(-1, x.shape[-1]).double() @ W
    if bias is not None:
        ref = ref + bias.double()
    return ref.reshape(*x.shape[:-1], W.shape[1])
