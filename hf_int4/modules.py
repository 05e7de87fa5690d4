"""`HfInt4Linear`: a linear layer holding 4-bit GPTQ weights.

A layer holds its weight in one of two forms, named apart in its buffers and state dict:
- "gptq": buffers named like a GPTQ checkpoint's tensors (qweight, qzeros, scales, g_idx), so that
  transformers loads a GPTQ checkpoint into them as it is;
- "packed": the kernel layout (`hf_int4.packing`), buffers `int4_qweight`, `int4_scales`,
  `int4_zeros` (asymmetric only), `int4_perm` (act-order only).
`finalize()`, after loading, validates the weights and, where the GPU kernels can run, repacks a
"gptq" layer (freeing the GPTQ tensors) and plans its GPU paths (hf_int4.dispatch). Each call then runs
the path its plan names for the call's number of rows, or on CPU the exact reference.
"""
from typing import Callable, Optional

import torch
from torch import nn

from hf_int4 import _extension, dispatch
from hf_int4.formats.gptq import GPTQConfig, GPTQLayer, as_int32_g_idx
from hf_int4.packing import SUPPORTED_DTYPES, PackedInt4Weight, kernel_group_size, pack_gptq_layer, zeros_for_dtype
from hf_int4.reference import dequantize_gptq, dequantize_packed, gptq_matmul_reference, matmul_reference

GPTQ_TENSOR_NAMES = ("qweight", "qzeros", "scales", "g_idx")
PACKED_PREFIX = "int4_"


def quantized_layer_names(keys) -> set:
    """The layers a checkpoint's (or state dict's) tensor names hold quantized, in the GPTQ or the packed form."""
    return {prefix for prefix, _, suffix in (key.rpartition(".") for key in keys)
            if suffix in ("qweight", PACKED_PREFIX + "qweight")}


def pack_for_module(layer: GPTQLayer, dtype: torch.dtype) -> PackedInt4Weight:
    """pack_gptq_layer, keeping an (identity) perm for every act-order layer: the buffers a layer has
    then follow from its config alone, which loading a packed checkpoint needs."""
    packed = pack_gptq_layer(layer, dtype)
    if layer.config.desc_act and packed.perm is None:
        packed.perm = torch.arange(layer.in_features, dtype=torch.int32, device=packed.qweight.device)
    return packed


def packed_state_dict(packed: PackedInt4Weight, bias, prefix: str = "") -> dict:
    """The state-dict entries of one layer in the packed layout (what packed checkpoints hold)."""
    state = {prefix + PACKED_PREFIX + k: v for k, v in packed.tensors().items()}
    if bias is not None:
        state[prefix + "bias"] = bias
    return state


class HfInt4Linear(nn.Module):
    holds_fused_members = False  # hf_int4.fusion.HfInt4FusedLinear: the weights of sibling layers side by side

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        config: GPTQConfig,
        dtype: torch.dtype = torch.float16,
        device=None,
        name: str = "",
        packed: bool = False,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.config = config
        self.dtype = dtype
        self.name = name  # the module's path in the model, for error messages
        self.is_packed = packed
        if packed:
            empty = PackedInt4Weight.empty(
                in_features, out_features, config.group_size, dtype, sym=config.sym, act_order=config.desc_act, device=device
            )
            self._register_packed(empty)
        else:
            groups = config.num_groups(in_features)
            self.register_buffer("qweight", torch.empty(in_features // 8, out_features, dtype=torch.int32, device=device))
            self.register_buffer("qzeros", torch.empty(groups, out_features // 8, dtype=torch.int32, device=device))
            # float32 holds fp16, bf16 and fp32 scales exactly: loading casts a stored tensor into its buffer's dtype,
            # and fp16 would flush small bf16 scales and overflow large ones; packing rounds them once
            self.register_buffer("scales", torch.empty(groups, out_features, dtype=torch.float32, device=device))
            self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self.derive_g_idx = False  # set when the checkpoint has no g_idx for this layer
        self._dispatch = None  # (device, dispatch.Plan) once planned
        self._packed = None  # packed_weight()'s view of the buffers
        self._fused_into = None  # (hf_int4.fusion.HfInt4FusedLinear holding the weights, slot) once fused

    def gptq_layer(self) -> GPTQLayer:
        return GPTQLayer(
            name=self.name, qweight=self.qweight, qzeros=self.qzeros, scales=self.scales, g_idx=self.g_idx,
            bias=self.bias, config=self.config,
        )

    def packed_weight(self) -> PackedInt4Weight:
        """The PackedInt4Weight view of this layer's buffers.

        Kept between calls (building it costs ~15 us of Python, per layer and call, which an eager forward
        of many layers feels) and rebuilt whenever a buffer is no longer the same tensor: .to() / .cuda(),
        accelerate's offload hooks and re-registration all replace buffers. Compiled code builds it afresh,
        so no cache object enters a traced graph."""
        if self._fused_into is not None:
            holder, slot = self._fused_into
            return holder.member_weights(slot)[0]
        buffers = self._buffers
        names = PackedInt4Weight.TENSOR_NAMES
        compiling = torch.compiler.is_compiling()
        cached = self._packed
        if compiling or cached is None or any(buffers.get(PACKED_PREFIX + name) is not getattr(cached, name) for name in names):
            cached = PackedInt4Weight(
                *(buffers.get(PACKED_PREFIX + name) for name in names),
                self.in_features,
                self.out_features,
                kernel_group_size(self.config.group_size),
            )
            if not compiling:
                self._packed = cached
        return cached

    def _apply(self, fn, recurse=True):
        """.to(dtype) / .half() / .bfloat16() convert the buffers, and `dtype` (what the layer computes in) follows.
        Packed zeros hold magic + z for the scales' dtype (1024 + z in float16, 128 + z in bfloat16), so a change
        between the two re-expresses them for the new dtype instead of rounding 1024 + z into bfloat16 (a silently
        wrong layer); the plan is made again for it. To any other dtype (float32, float64) the packed scales and zeros
        keep the dtype they were packed for and only follow the device: the layer then computes in that dtype on the
        reference path, exactly, and a whole model converts instead of stopping half-way at its first asymmetric
        layer. In GPTQ form (the CPU path) no buffer records the activation dtype: packed_state_dict packs for
        `dtype` and save_pretrained records it as the checkpoint's packed_dtype."""
        new_dtype = _converted_dtype(fn, self.bias.device if self.bias is not None else None)
        scales = self._buffers.get(PACKED_PREFIX + "scales")
        kept = {}
        if new_dtype is not None and scales is not None and new_dtype != scales.dtype:
            names = (PACKED_PREFIX + "scales", PACKED_PREFIX + "zeros")
            if new_dtype not in SUPPORTED_DTYPES:
                kept = {name: self._buffers[name] for name in names if self._buffers.get(name) is not None}
            else:
                zeros = self._buffers.get(names[1])
                if zeros is not None:
                    self._buffers[names[1]] = zeros_for_dtype(zeros, new_dtype)  # float32; fn converts it like the scales
        if new_dtype is not None and new_dtype != self.dtype:
            self.dtype = new_dtype
            self._dispatch = None  # the plan was made for the old dtype
        super()._apply(fn, recurse)
        for name, tensor in kept.items():
            self._buffers[name] = tensor.to(self._buffers[name].device)
        return self

    def reference_path_reason(self) -> Optional[str]:
        """Why this layer's calls take the exact reference path (torch on the dequantized weight), or None where the
        GPU kernels serve them."""
        holder = self._fused_into[0] if self._fused_into is not None else self
        if not holder.is_packed:
            return "its weights are in GPTQ form: no GPU held it at load"
        if self.dtype not in SUPPORTED_DTYPES:
            return f"it computes in {self.dtype}; the kernels take float16 and bfloat16"
        device = getattr(holder, PACKED_PREFIX + "qweight").device
        if device.type != "cuda":
            return f"its weights are on {device}"
        if not _extension.extension_available():
            return "the CUDA extension hf_int4._C is not built"
        return None

    def _register_packed(self, packed: PackedInt4Weight):
        for tensor_name, tensor in packed.tensors().items():
            self.register_buffer(PACKED_PREFIX + tensor_name, tensor)

    @torch.no_grad()
    def finalize(self):
        """After loading: validate, and on a GPU with kernels repack "gptq" weights (freeing the originals)."""
        if self._fused_into is not None:
            return
        if self.is_packed:
            self.packed_weight().validate()
            if self._check_kernel_path():
                self.dispatch_plan()
            return
        if self.derive_g_idx:
            self.g_idx.copy_(self.config.group_of_rows(self.in_features, device=self.g_idx.device))
        else:  # loading keeps a stored g_idx's dtype
            self.g_idx = as_int32_g_idx(self.g_idx)
        layer = self.gptq_layer()
        layer.validate()
        if self._check_kernel_path():
            self._register_packed(pack_for_module(layer, self.dtype))
            for tensor_name in GPTQ_TENSOR_NAMES:
                delattr(self, tensor_name)
            self.is_packed = True
            self.dispatch_plan()

    def dispatch_plan(self, device=None) -> dispatch.Plan:
        """The path per range of M on `device` (default: where the weights are), fixed once per device.

        It reads the dispatch tables, so it is made in finalize(), before any compiled or captured call."""
        if self._fused_into is not None:
            return self._fused_into[0].dispatch_plan(device)
        device = torch.device(device) if device is not None else getattr(self, PACKED_PREFIX + "qweight").device
        if self._dispatch is None or self._dispatch[0] != device:
            plan = dispatch.plan_for(dispatch.LinearSpec.of(self.packed_weight()), device)
            dispatch.logger.debug("%s (%dx%d): %s", self.name, self.in_features, self.out_features, plan.describe())
            self._dispatch = (device, plan)
        return self._dispatch[1]

    def _check_kernel_path(self) -> bool:
        device = getattr(self, PACKED_PREFIX + "qweight" if self.is_packed else "qweight").device
        if not _extension.kernels_usable(device):
            if device.type == "cpu":
                _extension.warn_reference_path_once("no CUDA device holds the model")
            return False
        if self.dtype not in SUPPORTED_DTYPES:
            _extension.warn_reference_path_once(f"the GPU kernels take float16/bfloat16 activations, not {self.dtype}")
            return False
        return True

    def packed_state_dict(self, prefix: str = "") -> dict:
        """The layer's tensors in the packed layout (packing on the CPU a layer still in "gptq" form)."""
        if self._fused_into is not None:
            holder, slot = self._fused_into
            return packed_state_dict(*holder.member_weights(slot), prefix)
        if self.is_packed:
            packed = self.packed_weight()
        else:
            if self.dtype not in SUPPORTED_DTYPES:
                raise ValueError(
                    f"layer {self.name}: packed checkpoints hold float16 or bfloat16 scales; this model is {self.dtype}"
                )
            packed = pack_for_module(self.gptq_layer(), self.dtype)
        return packed_state_dict(packed, self.bias, prefix)

    @torch.no_grad()
    def dequantized_linear(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """The float nn.Linear this layer stands for (model.dequantize()): weight (q - z) * s, computed exactly in
        fp32 and rounded once to `dtype` (default: the layer's), on the weights' device."""
        if self._fused_into is not None:
            packed, bias = self._fused_into[0].member_weights(self._fused_into[1])
            weight = dequantize_packed(packed)
        elif self.is_packed:
            packed, bias = self.packed_weight(), self.bias
            weight = dequantize_packed(packed)
        else:
            layer = self.gptq_layer()
            weight, bias = dequantize_gptq(layer), self.bias
        dtype = dtype or self.dtype
        linear = nn.Linear(self.in_features, self.out_features, bias is not None, device=weight.device, dtype=dtype)
        linear.weight.copy_(weight.t())
        if bias is not None:
            linear.bias.copy_(bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused_into is not None:
            holder, slot = self._fused_into
            return holder.member_output(slot, x)
        if not self.is_packed:
            return gptq_matmul_reference(x, self.gptq_layer())
        path = self._kernel_path(x, self.in_features)
        if path is not None:
            return path.run(x, self.packed_weight(), self.bias)
        return matmul_reference(x, dequantize_packed(self.packed_weight()), self.bias)

    def forward_gated(self, h: torch.Tensor, up_offset: int) -> torch.Tensor:
        """self(silu(h[..., :K]) * h[..., up_offset:up_offset + K]): a gated MLP's down projection called on its gate
        and up projections' fused output (hf_int4.fusion), which the decode kernel takes as it is."""
        path = self._kernel_path(h, h.shape[-1]) if self._fused_into is None else None
        if path is not None:
            return path.run_gated(h, up_offset, self.packed_weight(), self.bias)
        from hf_int4.ops import silu_mul  # (as hf_int4.dispatch: the ops module loads the extension)

        return self(silu_mul(h, self.in_features, up_offset))

    def _kernel_path(self, x: torch.Tensor, width: int):
        """The dispatched kernel path for an input whose rows are `width` wide, or None where it takes the reference
        path (CPU, no extension, another dtype, weights still in GPTQ form)."""
        if not (self.is_packed and x.is_cuda and _extension.extension_available() and x.dtype in SUPPORTED_DTYPES):
            return None
        rows = x.numel() // width if width else 0
        return self.dispatch_plan(x.device).path(rows)

    def extra_repr(self) -> str:
        cfg = self.config
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"group_size={cfg.group_size}, sym={cfg.sym}, desc_act={cfg.desc_act}, "
            f"weights={'gptq' if not self.is_packed else 'packed' if self._fused_into is None else 'fused'}"
        )


def _converted_dtype(fn, device) -> Optional[torch.dtype]:
    """The floating dtype that a Module._apply function converts tensors to, None where it keeps each tensor's
    (a device move): probed on two empty tensors of different dtypes."""
    a, b = (fn(torch.empty(0, dtype=dtype, device=device)).dtype for dtype in (torch.float32, torch.float16))
    return None if (a, b) == (torch.float32, torch.float16) else a


def dequantize_layers(model: nn.Module, dtype: Optional[torch.dtype] = None) -> list:
    """Every HfInt4Linear back to the float nn.Linear it stands for (dequantized_linear), the fused GEMMs and gated MLP
    forwards (hf_int4.fusion) undone; returns the names replaced."""
    replaced = []
    for name, module in list(model.named_modules()):
        if hasattr(module, "_hf_int4_gated"):  # back to the MLP's own forward
            del module.forward, module._hf_int4_gated
        if isinstance(module, HfInt4Linear) and not module.holds_fused_members:  # (removed below)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.dequantized_linear(dtype))
            replaced.append(name)
    for name, module in list(model.named_modules()):
        for child, sub in list(module.named_children()):
            if isinstance(sub, HfInt4Linear) and sub.holds_fused_members:  # its members hold their own weights now
                delattr(module, child)
    return replaced


def replace_linear_layers(
    model: nn.Module, settings: Callable[[str], Optional[GPTQConfig]], dtype=torch.float16, packed: bool = False
) -> list:
    """Swap every nn.Linear for an HfInt4Linear of `settings(name)`, except where that is None; returns the names
    swapped."""
    swapped = []
    for name, module in list(model.named_modules()):
        config = settings(name) if isinstance(module, nn.Linear) else None
        if config is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.device("meta"):
            new = HfInt4Linear(
                module.in_features, module.out_features, module.bias is not None, config, dtype=dtype, name=name,
                packed=packed,
            )
        setattr(parent, child, new)
        swapped.append(name)
    return swapped

