"""`HfInt4Config`: the transformers quantization config of the `hf_int4` method."""
import dataclasses

from transformers.quantizers.auto import register_quantization_config
from transformers.utils import logging
from transformers.utils.quantization_config import QuantizationConfigMixin

from hf_int4.formats.gptq import GPTQConfig, ModuleRules

QUANT_METHOD = "hf_int4"
PACKED_LAYOUT = "cutlass-reordered-int4-v2"  # bump when hf_int4.packing changes the bytes it writes


logger = logging.get_logger(__name__)


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):  # bool("false") is True
        raise ValueError(f"HfInt4Config: {name} must be True or False, got {value!r}")
    return value


@register_quantization_config(QUANT_METHOD)
class HfInt4Config(QuantizationConfigMixin):
    """Load 4-bit GPTQ weights with hf_int4's kernels.

    Passed to `from_pretrained` on a GPTQ checkpoint, it takes the checkpoint's own GPTQ settings
    (bits, group_size, sym, desc_act, checkpoint_format, and GPTQModel's per-module `dynamic` rules and
    quantized `lm_head`: hf_int4.formats.gptq.ModuleRules) from its config.json, which the checkpoint must have
    (older AutoGPTQ checkpoints with only quantize_config.json: `hf-int4 repack` converts them); the caller's choices
    are modules_to_not_convert (names or name patterns kept float) and fuse_projections: on a GPU, run sibling
    projections that read the same input (q/k/v, gate/up) as one GEMM over their concatenated weights
    (hf_int4.fusion); False keeps one GEMM per layer.
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 128,
        sym: bool = True,
        desc_act: bool = False,
        checkpoint_format: str = "gptq",
        modules_to_not_convert=None,
        weight_format: str = "gptq",
        packed_dtype=None,
        packed_layout=None,
        fuse_projections: bool = True,
        dynamic=None,
        lm_head: bool = False,
        **kwargs,
    ):
        self.quant_method = QUANT_METHOD
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        self.desc_act = desc_act
        self.checkpoint_format = checkpoint_format
        if isinstance(modules_to_not_convert, str):  # one name, not its characters
            modules_to_not_convert = [modules_to_not_convert]
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert else None
        if not all(isinstance(m, str) for m in self.modules_to_not_convert or ()):
            raise ValueError(f"HfInt4Config: modules_to_not_convert must be module names, got {modules_to_not_convert!r}")
        # What the checkpoint on disk holds: "gptq" tensors (repacked on load) or our "packed" layout
        # (written by save_pretrained / `hf-int4 repack`), whose scales are in `packed_dtype`.
        self.weight_format = weight_format
        self.packed_dtype = packed_dtype
        self.packed_layout = packed_layout
        self.fuse_projections = _flag("fuse_projections", fuse_projections)
        # The rules as [pattern, settings] pairs, not a dict: transformers writes config.json with sorted keys, and
        # the rules' order decides (the first match wins). Settings and rules are validated now, not at the first layer.
        self.dynamic = ModuleRules(self.gptq_config(), dynamic).pairs or None
        self.lm_head = _flag("lm_head", lm_head)
        unknown = sorted(set(kwargs) - {"quant_method"})
        if unknown:  # a misspelt option would otherwise be silently ignored
            logger.warning(f"HfInt4Config: ignoring unknown argument(s) {', '.join(unknown)}")
        if weight_format not in ("gptq", "packed"):
            raise ValueError(f"HfInt4Config: weight_format must be 'gptq' or 'packed', got {weight_format!r}")
        if weight_format == "packed" and packed_layout != PACKED_LAYOUT:
            raise ValueError(
                f"this checkpoint's packed_layout is {packed_layout!r}; this hf_int4 reads {PACKED_LAYOUT!r}: "
                "repack it from the original GPTQ checkpoint with `hf-int4 repack`"
            )

    def mark_packed(self, dtype) -> None:
        """Describe a checkpoint written in our packed layout with scales of `dtype`."""
        self.weight_format = "packed"
        self.packed_dtype = str(dtype).removeprefix("torch.")
        self.packed_layout = PACKED_LAYOUT

    def gptq_config(self) -> GPTQConfig:
        return GPTQConfig(
            bits=self.bits,
            group_size=self.group_size,
            sym=self.sym,
            desc_act=self.desc_act,
            checkpoint_format=self.checkpoint_format,
        )

    def module_rules(self) -> ModuleRules:
        """The settings per module (`dynamic`, `lm_head`)."""
        return ModuleRules(self.gptq_config(), self.dynamic, self.lm_head)

    @classmethod
    def from_gptq_dict(cls, gptq: dict, modules_to_not_convert=None, fuse_projections: bool = True) -> "HfInt4Config":
        """Take over a GPTQ checkpoint's quantization_config (as a dict)."""
        parsed = GPTQConfig.from_dict(gptq)
        return cls(**dataclasses.asdict(parsed), modules_to_not_convert=modules_to_not_convert,
                   fuse_projections=fuse_projections, dynamic=gptq.get("dynamic"), lm_head=gptq.get("lm_head") or False)
