"""`HfInt4Linear`: a linear layer holding 4-bit GPTQ weights.

Life of a layer: it is created with buffers named like the GPTQ checkpoint's tensors (qweight, qzeros,
scales, g_idx, bias) so that transformers loads them as they are; `finalize()` then validates them and,
where the GPU kernels can run, repacks them into the kernel layout and frees the GPTQ tensors. Where
they cannot (CPU, no extension), the layer keeps the GPTQ tensors and runs the exact reference.
"""
from typing import Optional

import torch
from torch import nn

from hf_int4 import _extension
from hf_int4.formats.gptq import GPTQConfig, GPTQLayer
from hf_int4.packing import SUPPORTED_DTYPES, kernel_group_size, pack_gptq_layer
from hf_int4.reference import gptq_matmul_reference

GPTQ_TENSOR_NAMES = ("qweight", "qzeros", "scales", "g_idx")
PACKED_PREFIX = "int4_"  # packed buffers get their own names: a state dict never mixes up the two layouts


class HfInt4Linear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        config: GPTQConfig,
        dtype: torch.dtype = torch.float16,
        device=None,
        name: str = "",
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.config = config
        self.dtype = dtype
        self.name = name  # the module's path in the model, for error messages
        groups = config.num_groups(in_features)
        self.register_buffer("qweight", torch.empty(in_features // 8, out_features, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.empty(groups, out_features // 8, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.empty(groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self.is_packed = False  # True once finalized on a GPU: the buffers are then PACKED_PREFIX + layout names

    def gptq_layer(self) -> GPTQLayer:
        return GPTQLayer(
            name=self.name,
            qweight=self.qweight,
            qzeros=self.qzeros,
            scales=self.scales,
            g_idx=self.g_idx,
            bias=self.bias,
            config=self.config,
        )

    @torch.no_grad()
    def finalize(self):
        """Validate the loaded GPTQ tensors and, on a GPU with kernels, repack them (freeing the originals)."""
        layer = self.gptq_layer()
        layer.validate()
        device = self.qweight.device
        if not _extension.kernels_usable(device):
            if device.type == "cpu":
                _extension.warn_reference_path_once("no CUDA device holds the model")
            return
        if self.dtype not in SUPPORTED_DTYPES:
            _extension.warn_reference_path_once(f"the GPU kernels take float16/bfloat16 activations, not {self.dtype}")
            return

        packed = pack_gptq_layer(layer, self.dtype)
        for tensor_name in GPTQ_TENSOR_NAMES:
            delattr(self, tensor_name)
        for tensor_name, tensor in packed.tensors().items():
            self.register_buffer(PACKED_PREFIX + tensor_name, tensor)
        self.is_packed = True

    def packed_weight(self):
        """The PackedInt4Weight view of this layer's buffers (rebuilt per call so that .to() / .cuda() stay valid)."""
        from hf_int4.packing import PackedInt4Weight

        return PackedInt4Weight(
            *(getattr(self, PACKED_PREFIX + name, None) for name in PackedInt4Weight.TENSOR_NAMES),
            self.in_features,
            self.out_features,
            kernel_group_size(self.config.group_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_packed:
            from hf_int4.ops import int4_gemm

            return int4_gemm(x, self.packed_weight(), self.bias)
        return gptq_matmul_reference(x, self.gptq_layer())

    def extra_repr(self) -> str:
        cfg = self.config
        path = "kernel" if self.is_packed else "reference"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"group_size={cfg.group_size}, sym={cfg.sym}, desc_act={cfg.desc_act}, path={path}"
        )


def replace_linear_layers(
    model: nn.Module, config: GPTQConfig, modules_to_not_convert=(), dtype=torch.float16
) -> list:
    """Swap every nn.Linear not named in `modules_to_not_convert` for an HfInt4Linear; returns the names swapped."""
    swapped = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or _is_excluded(name, modules_to_not_convert):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.device("meta"):
            new = HfInt4Linear(
                module.in_features, module.out_features, module.bias is not None, config, dtype=dtype, name=name
            )
        setattr(parent, child, new)
        swapped.append(name)
    return swapped


def _is_excluded(name: str, modules_to_not_convert) -> bool:
    return any(name == skip or name.endswith("." + skip) or name.startswith(skip + ".") for skip in modules_to_not_convert)
