"""Sibling projections that read the same input (q/k/v, gate/up), fused into one GEMM after loading.

transformers' Llama-family modules call q_proj, k_proj and v_proj (and gate_proj, up_proj) one after
another on the same hidden states. In decode each call is a small GEMM whose fixed cost (launch, pipeline
fill, the split-K tail) is a large share of its time, most of all on the small k/v layers; one GEMM over
the concatenated packed weights pays it once (H200, M = 1: 4096x6144 8.1 us vs 5.9 + 2 x 3.9 for
4096x4096 + 2 x 4096x1024). The packed layout is column-blocked (hf_int4.packing), so the fused weight is
the members' packed tensors side by side, each padded to 128 columns, and one copy of the weights serves:
the members keep none of their own.

The first member called computes the fused GEMM and keeps it with its input; a member called with that
same input tensor (not modified in place since) takes its columns from it, and the last member to do so
drops it. Any other input, or a member asking twice, recomputes, so an unusual call order costs time, never a wrong
answer (under torch.inference_mode, whose tensors have no version counter, an input changed in place between two
different members' calls is not seen: transformers' models call them back to back). Under
torch.compile the whole exchange is traced into one GEMM and three views.

A gated MLP, down(silu(gate(x)) * up(x)), then runs as two GEMMs and nothing between: its forward hands the fused
gate/up output to the down projection as it is (HfInt4Linear.forward_gated), whose decode kernel forms
silu(gate) * up as it reads its input (other paths form it first). In a batch-1 decode step that saves a kernel
and its launch gap per layer. It replaces the MLP module's forward only where the MLP is the known pattern: its
act_fn is SiLU and, on a probe input at load time, the replaced forward gives what the model's own forward gives.
"""
import functools
from typing import List, Optional, Sequence

import torch

from hf_int4.dispatch import logger
from hf_int4.modules import PACKED_PREFIX, HfInt4Linear
from hf_int4.packing import PackedInt4Weight, padded_sizes

# Children of one module that transformers' models (and hf_int4.experts) call on the same input, in call order;
# w1 / w3: Mixtral's expert gate / up.
SIBLING_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))
# A gated MLP's (gate, up) sibling group and its down projection
GATED_MLP_DOWN = {("gate_proj", "up_proj"): "down_proj", ("w1", "w3"): "w2"}
FUSED_PREFIX = "int4_fused_"


class HfInt4FusedLinear(HfInt4Linear):
    """The packed weights of sibling HfInt4Linear layers side by side; the members call it (member_output)."""

    holds_fused_members = True

    def __init__(self, members: Sequence[HfInt4Linear], name: str):
        first = members[0]
        packed = [m.packed_weight() for m in members]
        widths = [p.n_padded for p in packed[:-1]] + [members[-1].out_features]
        with torch.device("meta"):
            super().__init__(first.in_features, sum(widths), any(m.bias is not None for m in members), first.config,
                             dtype=first.dtype, name=name, packed=True)
        self._register_packed(PackedInt4Weight(
            torch.cat([p.qweight for p in packed], dim=1),
            torch.cat([p.scales for p in packed], dim=1),
            None if packed[0].zeros is None else torch.cat([p.zeros for p in packed], dim=1),
            packed[0].perm,
            self.in_features, self.out_features, packed[0].group_size,
        ).validate())
        if self.bias is not None:  # a member without bias adds zeros; padding columns too
            self.bias = torch.cat([
                torch.nn.functional.pad(m.bias if m.bias is not None else packed[0].scales.new_zeros(m.out_features),
                                        (0, w - m.out_features))
                for m, w in zip(members, widths)
            ])
        self.member_columns = tuple((sum(widths[:i]), m.out_features, m.bias is not None) for i, m in enumerate(members))
        self._pending = None  # (input, fused output, input version, bit mask of the members that took theirs)

    def member_output(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        pending = self._pending
        # a member asking again is a new call: inference tensors have no version counter to tell a changed input by
        if pending is None or pending[0] is not x or pending[2] != _version(x) or pending[3] >> slot & 1:
            pending = (x, self(x), _version(x), 0)
        taken = pending[3] | 1 << slot
        self._pending = None if taken == (1 << len(self.member_columns)) - 1 else pending[:3] + (taken,)
        start, width, _ = self.member_columns[slot]
        return pending[1][..., start:start + width]

    def member_weights(self, slot: int):
        """(PackedInt4Weight, bias) of one member, copied out of the fused tensors (saving, inspection)."""
        start, width, has_bias = self.member_columns[slot]
        n_pad = padded_sizes(self.in_features, width)[1]
        fused = self.packed_weight()
        cols = slice(start, start + n_pad)
        packed = PackedInt4Weight(
            fused.qweight[:, 2 * start:2 * (start + n_pad)].contiguous(),
            fused.scales[:, cols].contiguous(),
            None if fused.zeros is None else fused.zeros[:, cols].contiguous(),
            None if fused.perm is None else fused.perm.clone(),
            self.in_features, width, fused.group_size,
        )
        return packed, (self.bias[start:start + width].clone() if has_bias else None)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", members={len(self.member_columns)}"


def _version(x: torch.Tensor) -> Optional[int]:
    """x's in-place version counter; None where there is none (traced code: dynamo tracks the tensors
    itself; inference-mode tensors)."""
    return None if torch.compiler.is_compiling() or x.is_inference() else x._version


def why_not_fused(members: Sequence[HfInt4Linear]) -> Optional[str]:
    """None when these layers can share one packed weight, else the reason."""
    first = members[0]
    if not all(m.is_packed and m._fused_into is None for m in members):
        return "not all in the packed layout"
    perm = first.packed_weight().perm
    for m in members[1:]:
        for what, a, b in (("in_features", m.in_features, first.in_features), ("GPTQ settings", m.config, first.config),
                           ("dtype", m.dtype, first.dtype), ("device", m.int4_qweight.device, first.int4_qweight.device)):
            if a != b:
                return f"{m.name} differs from {first.name} in {what}"
        other = m.packed_weight().perm
        if (perm is None) != (other is None) or (perm is not None and not torch.equal(perm, other)):
            return f"{m.name} has another act-order permutation than {first.name}"
    return None


def fuse_group(parent: torch.nn.Module, names: Sequence[str]) -> Optional[HfInt4FusedLinear]:
    """Fuse parent's children `names` (HfInt4Linear, packed) into one HfInt4FusedLinear child of `parent`;
    None (nothing changed, the reason logged at debug level) when they cannot share a packed weight."""
    members: List[HfInt4Linear] = [getattr(parent, n) for n in names]
    why = why_not_fused(members)
    if why is not None:
        logger.debug("not fused: %s", why)
        return None
    prefix = members[0].name.rpartition(".")[0]
    fused = HfInt4FusedLinear(members, f"{prefix}.{{{','.join(names)}}}" if prefix else "{" + ",".join(names) + "}")
    parent.add_module(FUSED_PREFIX + "_".join(names), fused)
    for slot, m in enumerate(members):
        for buffer in [b for b in m._buffers if b.startswith(PACKED_PREFIX)]:
            delattr(m, buffer)  # the fused module holds the only copy
        m.register_buffer("bias", None)
        m._packed = None
        m._dispatch = None
        m._fused_into = (fused, slot)
    return fused


def gated_mlp_forward(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The forward of a gated MLP whose gate / up projections are fused (set by fuse_gated_mlp)."""
    fused, down, up_offset = mlp._hf_int4_gated
    return down.forward_gated(fused(x), up_offset)


def _silu_modules() -> tuple:
    """torch's SiLU module and transformers' own (ACT2FN["silu"] in transformers 5)."""
    from transformers import activations

    return (torch.nn.SiLU,) + ((activations.SiLUActivation,) if hasattr(activations, "SiLUActivation") else ())


def why_not_gated(mlp: torch.nn.Module, names: Sequence[str]) -> Optional[str]:
    """None when fuse_gated_mlp can replace the forward of `mlp`, whose `names` (gate, up) are fused, else why not."""
    fused = getattr(mlp, FUSED_PREFIX + "_".join(names))
    down = getattr(mlp, GATED_MLP_DOWN.get(tuple(names), ""), None)
    if not isinstance(down, HfInt4Linear) or not down.is_packed or down._fused_into is not None:
        return f"{fused.name}: no packed HfInt4Linear down projection"
    if not isinstance(getattr(mlp, "act_fn", None), _silu_modules()):
        return f"{fused.name}: the activation is {type(getattr(mlp, 'act_fn', None)).__name__}, not SiLU"
    widths = {width for _, width, _ in fused.member_columns}
    if widths != {down.in_features} or down.dtype != fused.dtype or down.int4_qweight.device != fused.int4_qweight.device:
        return f"{fused.name} and {down.name} differ in width ({widths}, {down.in_features}), dtype or device"
    if "forward" in vars(mlp) or hasattr(mlp, "_hf_hook"):
        return f"{fused.name}: the MLP's forward is already replaced (e.g. by accelerate's hooks)"
    return None


@torch.no_grad()
def fuse_gated_mlp(mlp: torch.nn.Module, names: Sequence[str]) -> bool:
    """Replace the forward of `mlp`, whose gate / up projections `names` are fused, by gated_mlp_forward, where
    why_not_gated finds nothing and a probe input gives its own forward's output (else nothing changes, the reason
    logged at debug level). True when replaced."""
    why = why_not_gated(mlp, names)
    fused = getattr(mlp, FUSED_PREFIX + "_".join(names))
    if why is None:
        mlp._hf_int4_gated = (fused, getattr(mlp, GATED_MLP_DOWN[tuple(names)]), fused.member_columns[1][0])
        probe = torch.randn(2, fused.in_features, generator=torch.Generator().manual_seed(0))
        probe = probe.to(device=fused.int4_qweight.device, dtype=fused.dtype)
        want, got = type(mlp).forward(mlp, probe).float(), gated_mlp_forward(mlp, probe).float()
        if not bool((got - want).abs().max() <= 1e-2 * want.abs().max()):
            why = f"{fused.name}: the MLP's forward is not down(silu(gate(x)) * up(x)) on a probe input"
            del mlp._hf_int4_gated
    if why is not None:
        logger.debug("gated MLP not fused: %s", why)
        return False
    mlp.forward = functools.partial(gated_mlp_forward, mlp)  # as accelerate's hooks replace a module's forward
    return True


def fuse_sibling_projections(model: torch.nn.Module) -> List[HfInt4FusedLinear]:
    """Fuse every SIBLING_GROUPS group of packed HfInt4Linear layers on a GPU, and the gated MLPs among them
    (fuse_gated_mlp); returns the fused modules."""
    fused = []
    for parent in list(model.modules()):
        for names in SIBLING_GROUPS:
            children = [getattr(parent, n, None) for n in names]
            if not all(isinstance(c, HfInt4Linear) and c.is_packed and c._fused_into is None and c.int4_qweight.is_cuda
                       for c in children):
                continue
            group = fuse_group(parent, names)
            if group is not None:
                group.dispatch_plan()
                fused.append(group)
                if tuple(names) in GATED_MLP_DOWN:
                    fuse_gated_mlp(parent, names)
    return fused

