"""MoE experts as one linear layer per expert, so that GPTQ checkpoints of MoE models load.

transformers 5 holds the experts of Mixtral, Qwen-MoE and their kind fused: one 3-D parameter for all experts'
gate and up projections (`gate_up_proj`, [E, 2 I, H]) and one for their down projections ([E, H, I]). GPTQ
checkpoints (GPTQModel, AutoGPTQ) hold one quantized linear per expert, named as the original checkpoints name
them (`experts.{e}.gate_proj` / `up_proj` / `down_proj`, Mixtral's `experts.{e}.w1` / `w3` / `w2`).
`SequentialExperts` takes the fused module's place with those linears, so that the quantizer swaps each for an
HfInt4Linear and the checkpoint's tensors load into them by name. Its forward is transformers' eager experts loop
(each expert that receives tokens runs on them; one host sync per layer finds them): correct everywhere, not a
grouped MoE kernel, and a graph break under torch.compile.
"""
from typing import Iterator, Optional, Sequence, Tuple

import torch
from torch import nn
from transformers.integrations.moe import _default_apply_gate

# (gate, up, down) names of one expert's linears in checkpoints, besides those the model's conversion mapping names.
DEFAULT_PROJECTION_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
# Flags of transformers' use_experts_implementation whose non-default values change the computation.
_DEFAULT_LAYOUT_FLAGS = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
                         "has_post_expert_norm": False}


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), its linears named as the checkpoint names them."""

    def __init__(self, gate: nn.Module, up: nn.Module, down: nn.Module, names: Sequence[str], act_fn):
        super().__init__()
        self.names = tuple(names)
        for name, linear in zip(self.names, (gate, up, down)):
            self.add_module(name, linear)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, name) for name in self.names)
        return down(self.act_fn(gate(x)) * up(x))  # gate first: hf_int4.fusion serves up from the same GEMM


class SequentialExperts(nn.ModuleList):
    """The experts of one MoE block as a list of ExpertMLP, called as transformers calls its fused experts."""

    def __init__(self, experts: Sequence[ExpertMLP]):
        super().__init__(experts)
        self.num_experts = len(experts)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            if expert >= self.num_experts:  # transformers' marker of a slot routed to no local expert
                continue
            tokens, slots = torch.where(top_k_index == expert)
            expert_out = self[expert](hidden_states[tokens]) * top_k_weights[tokens, slots, None]
            out.index_add_(0, tokens, expert_out.to(out.dtype))
        return out


def fused_experts_modules(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """(name, module) of every fused experts module: one holding 3-D `gate_up_proj` and `down_proj` parameters."""
    for name, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if all(p in params and params[p].dim() == 3 for p in ("gate_up_proj", "down_proj")):
            yield name, module


def unsupported_layout(module: nn.Module) -> Optional[str]:
    """Why a fused experts module cannot be split into SequentialExperts, or None: only the common layout is taken
    (gate_up_proj [E, 2 I, H] holding gate then up, down_proj [E, H, I], act(gate) * up, no biases)."""
    extra = sorted(set(dict(module.named_parameters(recurse=False))) - {"gate_up_proj", "down_proj"})
    if extra:
        return f"its experts have parameters {extra} besides gate_up_proj and down_proj"
    flags = {f: getattr(module, f) for f, default in _DEFAULT_LAYOUT_FLAGS.items() if getattr(module, f, default) != default}
    if flags:
        return f"its experts' layout is {flags}"
    if getattr(type(module), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        return f"{type(module).__name__} gates its experts in its own way (_apply_gate)"
    if not callable(getattr(module, "act_fn", None)):
        return f"{type(module).__name__} has no act_fn"
    E, two_i, H = module.gate_up_proj.shape
    if two_i % 2 or tuple(module.down_proj.shape) != (E, H, two_i // 2):
        return f"gate_up_proj {tuple(module.gate_up_proj.shape)} and down_proj {tuple(module.down_proj.shape)} " \
               "are not [E, 2 I, H] and [E, H, I]"
    return None


def projection_names(model: nn.Module) -> list:
    """Candidate (gate, up, down) names of one expert's linears: those the model's conversion mapping merges into
    its fused experts (transformers' own record of the original checkpoints' names), then the common ones."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    found = {}
    for converter in get_model_conversion_mapping(model, add_legacy=False):
        if not isinstance(converter, WeightConverter):
            continue
        targets, sources = converter._original_target_patterns, converter._original_source_patterns
        names = [s.split("experts.*.")[-1].removesuffix(".weight") for s in sources if "experts.*." in s]
        if len(targets) == 1 and len(names) == len(sources):
            found[targets[0].rpartition(".")[2]] = names
    candidates = []
    if len(found.get("gate_up_proj", ())) == 2 and len(found.get("down_proj", ())) == 1:
        candidates.append((*found["gate_up_proj"], found["down_proj"][0]))
    return candidates + [n for n in DEFAULT_PROJECTION_NAMES if n not in candidates]


def split_experts(model: nn.Module, name: str, names: Sequence[str]):
    """Put SequentialExperts computing what the fused experts module `name` computes (its layout checked by
    unsupported_layout) in its place: an nn.Linear per expert and projection (`names`: gate, up, down), holding
    copies of the fused weights (none on the meta device)."""
    fused = model.get_submodule(name)
    E, two_i, _ = fused.gate_up_proj.shape
    inter = two_i // 2
    gate_up, down = fused.gate_up_proj.detach(), fused.down_proj.detach()

    def linear(weight):
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
        if weight.device.type != "meta":
            layer.weight.data.copy_(weight)
        return layer

    experts = SequentialExperts([
        ExpertMLP(linear(gate_up[e, :inter]), linear(gate_up[e, inter:]), linear(down[e]), names, fused.act_fn)
        for e in range(E)
    ])
    parent, _, child = name.rpartition(".")
    model.get_submodule(parent).register_module(child, experts)


def split_quantized_experts(model: nn.Module, quantized: set, stored: dict, renamed: set = frozenset()) -> None:
    """Before loading: put SequentialExperts (nn.Linear on the meta device) in the place of every fused experts
    module whose experts the checkpoint holds quantized (`quantized`: layer names; `stored`: every tensor name, as
    transformers loads them; `renamed`: those the checkpoint stores under another name); the quantizer then swaps the
    linears the checkpoint holds quantized. Refused, naming the layer: layouts unsupported_layout refuses, expert
    linears under names not known, and an expert kept in float beside quantized ones under a renamed name
    (Mixtral's block_sparse_moe -> mlp): transformers' conversion mapping would merge its float weights into the
    fused experts this block no longer has, leaving the expert's linears unloaded."""
    from hf_int4.formats.gptq import GPTQFormatError

    layers = {key.rpartition(".")[0] for key in stored}  # every layer the checkpoint holds, quantized or float
    candidates = None
    for name, module in list(fused_experts_modules(model)):
        held = sorted(layer for layer in quantized if layer.startswith(f"{name}."))
        if not held:
            continue
        why = unsupported_layout(module)
        if why is None:
            candidates = candidates or projection_names(model)
            experts = range(module.gate_up_proj.shape[0])
            names = next((n for n in candidates if all(f"{name}.{e}.{p}" in layers for e in experts for p in n)), None)
            if names is None:
                found = sorted({layer[len(name) + 1:].partition(".")[2] for layer in held})
                why = (f"its checkpoint names each expert's linears {found}, not one of {candidates} "
                       f"for every one of its {len(experts)} experts")
            else:
                float_renamed = [f"{name}.{e}.{p}" for e in experts for p in names
                                 if f"{name}.{e}.{p}" not in quantized and f"{name}.{e}.{p}.weight" in renamed]
                if float_renamed:
                    raise GPTQFormatError(
                        f"layer {float_renamed[0]}: the checkpoint keeps this expert in float (a dynamic rule) beside "
                        "quantized experts of its block, under a name transformers renames on load; its weights would "
                        "not load into this expert (not supported: quantize it too, or keep the whole block in float)")
        if why is not None:
            raise GPTQFormatError(f"layer {held[0]}: the checkpoint holds quantized MoE experts, but this model "
                                  f"({type(model).__name__}) cannot hold them: {why}")
        split_experts(model, name, names)


def split_float_experts(model: nn.Module) -> list:
    """Split every fused experts module of a float model whose layout allows it into SequentialExperts holding its
    weights (for writing GPTQ checkpoints, which quantize each expert's linears); returns the names split."""
    split = [name for name, module in fused_experts_modules(model) if unsupported_layout(module) is None]
    if split:
        names = projection_names(model)[0]
        for name in split:
            split_experts(model, name, names)
    return split
