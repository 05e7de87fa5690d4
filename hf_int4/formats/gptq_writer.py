"""Writing real-format GPTQ checkpoints: round-to-nearest or GPTQ quantization + AutoGPTQ/GPTQModel packing.

Round-to-nearest (RTN, no calibration data) is for test fixtures, the demo and benchmarks; with
calibration data quantize_model_state runs the GPTQ algorithm (gptq_solver) on the same grid. Either
way the files are byte-for-byte what AutoGPTQ (v1, "gptq") or GPTQModel (v2, "gptq_v2") write for the
same integers, so the reader and kernels see real checkpoints.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from hf_int4.formats.files import ShardWriter, atomic_output_dir
from hf_int4.formats.gptq import GPTQConfig, GPTQLayer, ModuleRules, _fail, is_excluded_module

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int64)
MAXQ = 15


# ------------------------------------------------------------------------------------------- quantizing


def _act_order_g_idx(perm: torch.Tensor, config: GPTQConfig, name: str) -> torch.Tensor:
    """GPTQ with desc_act quantizes columns in `perm` order and groups consecutive ones there:
    g_idx[perm[i]] = i // group_size."""
    K = perm.numel()
    perm = perm.long().cpu()
    if not torch.equal(torch.sort(perm).values, torch.arange(K)):
        _fail(name, f"act_order_perm is not a permutation of range(K={K})")
    g_idx = torch.empty(K, dtype=torch.int32)
    g_idx[perm] = config.group_of_rows(K)
    return g_idx


def group_range(W: torch.Tensor, g_idx: torch.Tensor, G: int, config: GPTQConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's find_params range per group: (xmin, xmax) [G, N] of W [K, N], row k in group g_idx[k].

    The range always contains 0; sym mirrors it to [-max|x|, max|x|]. One deliberate difference: sym
    always mirrors (GPTQ keeps xmin = 0 for an all-positive group, which clips half its values).
    An all-zero group gets [-1, 1] so that its scale stays positive."""
    index = g_idx.long().unsqueeze(1).expand_as(W)
    # Reducing onto zeros with include_self gives min(x.min(), 0) / max(x.max(), 0) in one go.
    xmin = torch.zeros(G, W.shape[1], device=W.device).scatter_reduce(0, index, W, "amin", include_self=True)
    xmax = torch.zeros(G, W.shape[1], device=W.device).scatter_reduce(0, index, W, "amax", include_self=True)
    if config.sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    return torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)


def grid_of_range(xmin: torch.Tensor, xmax: torch.Tensor, config: GPTQConfig, name: str = "") -> Tuple[torch.Tensor, torch.Tensor]:
    """(zeros int32, scales fp16) of ranges [xmin, xmax] containing 0: scale = (xmax - xmin) / 15;
    sym zero 8, asym zero = round(-xmin / scale)."""
    scale = (xmax - xmin) / MAXQ
    if config.sym:
        zeros = torch.full(scale.shape, (MAXQ + 1) // 2, dtype=torch.int32, device=scale.device)
    else:
        zeros = torch.round(-xmin / scale).clamp(0, MAXQ).to(torch.int32)
    scales = scale.clamp_min(torch.finfo(torch.float16).tiny).to(torch.float16)
    if not bool(torch.isfinite(scales).all()):
        _fail(name, "weights too large for fp16 scales (|w| > ~4.9e5)")
    return zeros, scales


def round_to_grid(W: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The 4-bit integers (as floats) nearest to W on the grid of zeros / fp16 scales broadcast against it.

    Rounding with the fp16 scales that get stored, as AutoGPTQ's pack() does, keeps
    |w - dequant| <= scale / 2 (up to fp16 rounding of the scale)."""
    return (torch.round(W / scales.float()) + zeros).clamp(0, MAXQ)


def quantize_rtn(
    weight: torch.Tensor,
    config: GPTQConfig,
    act_order_perm: Optional[torch.Tensor] = None,
    *,
    generator: Optional[torch.Generator] = None,
    name: str = "",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest 4-bit quantization of an nn.Linear weight [N, K] with GPTQ's Quantizer rules (group_range, grid_of_range).

    Returns (intweight int32 [K, N], zeros int32 [G, N] (true zeros), scales fp16 [G, N], g_idx int32 [K]).
    With desc_act (or an explicit act_order_perm) groups are formed over a permuted row order; without
    a perm a random one is drawn from `generator` (RTN has no Hessian to order by)."""
    W = weight.detach().float().t()  # [K, N]
    K = W.shape[0]
    if act_order_perm is None and config.desc_act:
        act_order_perm = torch.randperm(K, generator=generator)
    if act_order_perm is not None:
        g_idx = _act_order_g_idx(act_order_perm, config, name)
    else:
        g_idx = config.group_of_rows(K)
    g_idx = g_idx.to(W.device)
    zeros, scales = grid_of_range(*group_range(W, g_idx, config.num_groups(K), config), config, name)
    g = g_idx.long()
    intweight = round_to_grid(W, zeros[g], scales[g]).to(torch.int32)
    return intweight, zeros, scales, g_idx


# ---------------------------------------------------------------------------------------------- packing


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2^32) -> int32 with the same bits (what numpy's uint32 -> int32 astype does)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pack_rows(q: torch.Tensor) -> torch.Tensor:
    """[K, N] nibbles -> int32 [K/8, N]: row 8r + j goes to bits 4j..4j+3 of word r."""
    K, N = q.shape
    nib = q.to(torch.int64).reshape(K // 8, 8, N) << _SHIFTS.to(q.device).view(1, 8, 1)
    return _to_int32(nib.sum(1))  # nibbles do not overlap, so the sum is the bitwise or


def _pack_cols(z: torch.Tensor) -> torch.Tensor:
    """[G, N] nibbles -> int32 [G, N/8]: column 8c + j goes to bits 4j..4j+3 of word c."""
    G, N = z.shape
    nib = z.to(torch.int64).reshape(G, N // 8, 8) << _SHIFTS.to(z.device).view(1, 1, 8)
    return _to_int32(nib.sum(2))


def pack_gptq_tensors(
    intweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    config: GPTQConfig,
    *,
    name: str = "",
) -> Dict[str, torch.Tensor]:
    """Pack unpacked GPTQ integers [K, N] / true zeros [G, N] as AutoGPTQ (v1) or GPTQModel (v2) store them.

    v1 stores zero - 1. AutoGPTQ's own v1 packer turns a true zero of 0 into -1 = 0xFFFFFFFF and ORs
    it in, silently corrupting all 8 zeros of that word; we refuse instead. v1 can store a true zero
    of 16 (as 15), v2 cannot."""
    if intweight.dim() != 2:
        _fail(name, f"intweight must be 2-D [K, N], got shape {tuple(intweight.shape)}")
    K, N = intweight.shape
    G = config.num_groups(K)
    if K % 8:
        _fail(name, f"in_features K={K} is not a multiple of 8 (GPTQ packs 8 rows of 4 bits per int32 word)")
    if N % 8:
        _fail(name, f"out_features N={N} is not a multiple of 8 (GPTQ packs 8 zero points per int32 word)")
    if tuple(zeros.shape) != (G, N) or tuple(scales.shape) != (G, N) or tuple(g_idx.shape) != (K,):
        _fail(
            name,
            f"shapes zeros {tuple(zeros.shape)}, scales {tuple(scales.shape)}, g_idx {tuple(g_idx.shape)} do not "
            f"match K={K}, N={N}, group_size={config.group_size} (expected ({G}, {N}), ({G}, {N}), ({K},))",
        )
    if intweight.numel() and (int(intweight.min()) < 0 or int(intweight.max()) > MAXQ):
        _fail(name, f"intweight values must be in 0..15, found {int(intweight.min())}..{int(intweight.max())}")
    v1 = config.checkpoint_format == "gptq"
    stored = zeros.to(torch.int64) - 1 if v1 else zeros.to(torch.int64)
    bad = (stored < 0) | (stored > MAXQ)
    if bool(bad.any()):
        gi, n = bad.nonzero()[0].tolist()
        z = int(zeros[gi, n])
        if v1 and z == 0:
            _fail(
                name,
                f"checkpoint_format='gptq' (v1) stores zero - 1 and cannot store a true zero point of 0 "
                f"(group {gi}, column {n}); AutoGPTQ would silently corrupt it. Use checkpoint_format='gptq_v2'",
            )
        allowed = "1..16" if v1 else "0..15"
        _fail(name, f"zero point {z} at group {gi}, column {n} cannot be stored in checkpoint_format={config.checkpoint_format!r} (allowed {allowed})")
    return {
        "qweight": _pack_rows(intweight),
        "qzeros": _pack_cols(stored),
        "scales": scales.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def make_gptq_layer(name, intweight, zeros, scales, g_idx, config: GPTQConfig, bias=None) -> GPTQLayer:
    tensors = pack_gptq_tensors(intweight, zeros, scales, g_idx, config, name=name)
    if bias is not None:
        tensors["bias"] = bias
    return GPTQLayer.from_tensors(name, tensors, config)


def random_gptq_layer(
    K: int,
    N: int,
    config: GPTQConfig,
    *,
    seed: int = 0,
    generator: Optional[torch.Generator] = None,
    with_bias: bool = False,
    device="cpu",
    name: str = "random",
) -> Tuple[GPTQLayer, Dict[str, torch.Tensor]]:
    """A random valid layer plus its unpacked integers {intweight, zeros, scales, g_idx[, bias]}.

    Zeros cover the whole storable range: v1 asym 1..16 (16 is stored as nibble 15), v2 asym 0..15,
    sym 8. Scales are ~U(0.5, 1.5) / (4 sqrt(K)) so that x ~ N(0, 1) gives outputs of order 1."""
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    G = config.num_groups(K)
    intweight = torch.randint(0, 16, (K, N), generator=gen, dtype=torch.int32)
    if config.sym:
        zeros = torch.full((G, N), 8, dtype=torch.int32)
    else:
        lo = 1 if config.checkpoint_format == "gptq" else 0
        zeros = torch.randint(lo, lo + 16, (G, N), generator=gen, dtype=torch.int32)
    scales = ((torch.rand(G, N, generator=gen) + 0.5) / (4 * math.sqrt(K))).to(torch.float16)
    if config.desc_act:
        g_idx = _act_order_g_idx(torch.randperm(K, generator=gen), config, name)
    else:
        g_idx = config.group_of_rows(K)
    raw = {"intweight": intweight, "zeros": zeros, "scales": scales, "g_idx": g_idx}
    if with_bias:
        raw["bias"] = (torch.randn(N, generator=gen) * 0.1).to(torch.float16)
    raw = {k: v.to(device) for k, v in raw.items()}
    layer = make_gptq_layer(name, raw["intweight"], raw["zeros"], raw["scales"], raw["g_idx"], config, raw.get("bias"))
    return layer, raw


# ---------------------------------------------------------------------------------------------- writing


def quantized_linears(model: nn.Module, config: GPTQConfig, modules_to_not_convert=("lm_head",), dynamic=None) -> Dict[str, GPTQConfig]:
    """{name: settings} of the nn.Linear modules a checkpoint of `model` quantizes: those not excluded, with
    GPTQModel's `dynamic` rules applied (ModuleRules: "-:" leaves a module in float, others change its settings) to
    the names the checkpoint gives them."""
    from hf_int4.formats.names import saved_layer_name

    rules, saved_name = ModuleRules(config, dynamic), saved_layer_name(model)
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not is_excluded_module(name, modules_to_not_convert):
            settings = rules.config_for(saved_name(name))
            if settings is not None:
                layers[name] = settings
    return layers


@torch.no_grad()
def quantize_model_state(
    model: nn.Module,
    config: GPTQConfig,
    modules_to_not_convert=("lm_head",),
    *,
    dynamic: Optional[dict] = None,
    seed: int = 0,
    progress: bool = True,
    calibration: Optional[Sequence[torch.Tensor]] = None,
) -> Dict[str, torch.Tensor]:
    """The checkpoint's tensors: every nn.Linear of quantized_linears as GPTQ tensors, the rest as they are, named
    as transformers saves them (its conversion mapping reverted, e.g. Mixtral's `mlp` -> `block_sparse_moe`).

    With `calibration` (token-id tensors) the weights are chosen by GPTQ (gptq_solver) from the
    Hessians of those inputs, else rounded to nearest. An MoE model's fused experts are split in place into one
    nn.Linear per expert and projection (hf_int4.experts; the model computes the same), as GPTQ checkpoints hold them."""
    from tqdm.auto import tqdm
    from transformers.core_model_loading import revert_weight_conversion

    from hf_int4.experts import split_float_experts

    split_float_experts(model)
    gen = torch.Generator().manual_seed(seed)
    layers = quantized_linears(model, config, modules_to_not_convert, dynamic)
    modules = dict(model.named_modules())
    if calibration is None:
        quantized_layers = ((n, quantize_rtn(modules[n].weight, c, generator=gen, name=n)) for n, c in layers.items())
    else:
        from hf_int4.formats.gptq_solver import gptq_quantize_model  # it imports this module

        quantized_layers = gptq_quantize_model(model, calibration, layers)
    out: Dict[str, torch.Tensor] = {}
    done = set()
    desc = "RTN-quantizing" if calibration is None else "GPTQ-quantizing"
    for name, quantized in tqdm(quantized_layers, desc=desc, total=len(layers), unit="layer", disable=not progress):
        module = modules[name]
        packed = pack_gptq_tensors(*quantized, layers[name], name=name)
        out.update({f"{name}.{k}": v.cpu() for k, v in packed.items()})
        done.add(f"{name}.weight")
        if module.bias is not None:
            out[f"{name}.bias"] = module.bias.detach().cpu().contiguous()
            done.add(f"{name}.bias")
    seen = set()
    for key, t in model.state_dict().items():
        if key in done:
            continue
        # Tied weights (e.g. lm_head = embed_tokens) appear twice; safetensors refuses shared memory
        # and transformers re-ties on load, so keep only the first name.
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            continue
        seen.add(ident)
        out[key] = t.detach().cpu().contiguous()
    return revert_weight_conversion(model, out)


def write_gptq_checkpoint(
    model,
    out_dir,
    config: GPTQConfig,
    *,
    modules_to_not_convert=("lm_head",),
    dynamic: Optional[dict] = None,
    max_shard_size=None,
    tokenizer=None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    calibration: Optional[Sequence[torch.Tensor]] = None,
) -> str:
    """Quantize `model` (a transformers PreTrainedModel) into a GPTQ checkpoint directory: round-to-nearest,
    or GPTQ from the Hessians of `calibration` (a list of token-id tensors) when given. `dynamic`: GPTQModel's
    per-module rules (quantized_linears), written into the quantization config; a quantized output head is
    marked `lm_head: true` there, as GPTQModel does.

    Writes model.safetensors (or shards + index), config.json with quantization_config, quantize_config.json,
    the generation config and the tokenizer when given. Everything goes to a temporary directory next
    to out_dir that is renamed at the end, so out_dir is never half-written. An existing non-empty
    out_dir is replaced only with overwrite=True. Returns out_dir."""
    with atomic_output_dir(out_dir, overwrite) as tmp:
        tensors = quantize_model_state(
            model, config, modules_to_not_convert, dynamic=dynamic, seed=seed, progress=progress, calibration=calibration
        )
        writer = ShardWriter(tmp, max_shard_size)
        for key, tensor in tensors.items():
            writer.add(key, tensor)
        writer.finish()
        cfg = model.config.to_dict()
        if not cfg.get("architectures"):  # e.g. a model loaded from GGUF; tools read the class from here
            cfg["architectures"] = [type(model).__name__]
        quantization_config = config.to_dict()
        if dynamic:
            quantization_config["dynamic"] = dict(dynamic)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None and any(m is head for n, m in model.named_modules() if f"{n}.qweight" in tensors):
            quantization_config["lm_head"] = True
        cfg["quantization_config"] = quantization_config
        with open(os.path.join(tmp, "config.json"), "w") as f:  # unsorted: the dynamic rules' order decides
            json.dump(cfg, f, indent=2, default=str)
        with open(os.path.join(tmp, "quantize_config.json"), "w") as f:
            json.dump(quantization_config, f, indent=2)
        gen_cfg = getattr(model, "generation_config", None)
        if gen_cfg is not None:
            gen_cfg.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return os.path.abspath(os.fspath(out_dir))


def tiny_llama_config(**overrides):
    """A small LlamaConfig for tests. intermediate_size 352 is deliberately not a multiple of 128, so
    down_proj (K=352) has a last group of 96 rows at group_size 128."""
    from transformers import LlamaConfig

    kwargs = dict(
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)
