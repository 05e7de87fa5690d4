"""`HfInt4Quantizer`: swaps linear layers for `HfInt4Linear` before loading, repacks them after.

transformers refuses a `quantization_config` argument whose class differs from the checkpoint's
(`AutoHfQuantizer.merge_quantization_configs`). The least invasive way to let `HfInt4Config` take over
a GPTQ checkpoint is to wrap that one classmethod: when the argument is an `HfInt4Config` and the
checkpoint says `quant_method: gptq`, the result is an `HfInt4Config` built from the checkpoint's GPTQ
settings; every other case goes to transformers unchanged.
"""
import torch
from tqdm.auto import tqdm
from transformers.quantizers.auto import AutoHfQuantizer, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils import logging

from hf_int4.experts import split_quantized_experts
from hf_int4.formats.gptq import GPTQFormatError, ModuleRules, is_excluded_module, tensor_shapes
from hf_int4.formats.names import names_as_loaded
from hf_int4.fusion import HfInt4FusedLinear, fuse_sibling_projections
from hf_int4.integration.config import QUANT_METHOD, HfInt4Config
from hf_int4.modules import (
    PACKED_PREFIX,
    HfInt4Linear,
    dequantize_layers,
    quantized_layer_names,
    replace_linear_layers,
)
from hf_int4.packing import SUPPORTED_DTYPES

logger = logging.get_logger(__name__)


@register_quantizer(QUANT_METHOD)
class HfInt4Quantizer(HfQuantizer):
    requires_calibration = True  # we load GPTQ checkpoints; we do not quantize float weights

    def __init__(self, quantization_config, **kwargs):
        if not kwargs.get("pre_quantized", True):  # transformers' own message would blame an argument nobody passed
            raise ValueError(
                "hf_int4 loads GPTQ checkpoints, and this checkpoint's config.json has no quantization_config. Older "
                "AutoGPTQ checkpoints keep it in quantize_config.json: `hf-int4 repack CHECKPOINT OUT` reads it there and "
                "writes a checkpoint that loads; a float checkpoint must be quantized with GPTQ first.")
        super().__init__(quantization_config, **kwargs)

    def update_dtype(self, dtype):
        config = self.quantization_config
        if config.weight_format == "packed":
            # The packed scales are in the activation dtype they were packed for.
            packed = getattr(torch, config.packed_dtype)
            if dtype is not None and dtype != packed:
                logger.warning(f"hf_int4: this checkpoint was packed for {packed}; loading it as {packed}, not {dtype}")
            return packed
        # The kernels take 16-bit activations; fp16 is what GPTQ checkpoints were made for.
        return torch.float16 if dtype is None else dtype

    def _process_model_before_weight_loading(self, model, keep_in_fp32_modules=None, **kwargs):
        config = self.quantization_config
        files = kwargs.get("checkpoint_files") or ()
        stored = tensor_shapes([p for p in files if str(p).endswith(".safetensors")])
        checkpoint_names = names_as_loaded(model, stored, self)
        shapes = {loaded: stored[name] for loaded, name in checkpoint_names.items()}
        skipped = self.get_modules_to_not_convert(model, config.modules_to_not_convert or [], keep_in_fp32_modules)
        default_skips = self.get_modules_to_not_convert(model, [], add_default_skips=True)  # the output head, ...
        tied = {key.removesuffix(".weight") for key in getattr(model, "all_tied_weights_keys", None) or {}}
        settings = LayerSettings(config.module_rules(), shapes, skipped, default_skips, tied, checkpoint_names)
        self.renamed = {loaded for loaded, name in checkpoint_names.items() if loaded != name}
        split_quantized_experts(model, settings.quantized, shapes, self.renamed)
        swapped = replace_linear_layers(model, settings, dtype=model.dtype, packed=config.weight_format == "packed")
        check_checkpoint_tensors(model, shapes)
        check_every_quantized_expert_taken(model, settings.quantized - set(swapped))

    def _process_model_after_weight_loading(self, model, **kwargs):
        cast_renamed_float_parameters(model, getattr(self, "renamed", ()))
        layers = [m for m in model.modules() if isinstance(m, HfInt4Linear)]
        for module in tqdm(layers, desc="hf_int4: packing layers", disable=len(layers) < 8, leave=False):
            module.finalize()
        if self.quantization_config.fuse_projections:
            fused = fuse_sibling_projections(model)
            gated = sum(hasattr(m, "_hf_int4_gated") for m in model.modules())
            logger.info(f"hf_int4: fused {len(fused)} groups of sibling projections (q/k/v, gate/up) into one GEMM each; "
                        f"{gated} gated MLPs pass their gate/up output to the down projection as it is")
        return model

    def dequantize(self, model, dtype=None):
        """model.dequantize(): every quantized layer as the float nn.Linear its weights stand for, in `dtype` or else
        the dtype the layer computes in (transformers' default, config.dtype, does not follow model.to())."""
        dequantize_layers(model, getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        self.remove_quantization_config(model)
        return model

    def is_serializable(self, **kwargs):
        return True

    def get_state_dict_and_metadata(self, model):
        """Every HfInt4Linear is saved in the packed layout, so the checkpoint loads without repacking.

        The config records the model's dtype as the scales' (packed_dtype), which loading takes as the layers' dtype:
        a model of another dtype, or a layer whose packed scales are not in it, is refused before anything is written."""
        dtype = model.dtype
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"hf_int4: packed checkpoints hold float16 or bfloat16 scales; this model is {dtype}")
        state = model.state_dict()
        for name, module in model.named_modules():
            if isinstance(module, HfInt4Linear):
                prefix = name + "."
                for key in [k for k in state if k.startswith(prefix)]:
                    del state[key]
                if not isinstance(module, HfInt4FusedLinear):  # its members save their own columns
                    packed = module.packed_state_dict(prefix)
                    scales = packed[prefix + PACKED_PREFIX + "scales"]
                    if scales.dtype != dtype:
                        raise ValueError(f"layer {name}: its packed scales are {scales.dtype}, the model is {dtype}; "
                                         "a packed checkpoint records one dtype for all its layers")
                    state.update(packed)
        self.quantization_config.mark_packed(dtype)
        return state, {}

    @property
    def is_trainable(self):
        return False

    @property
    def is_compileable(self):
        return True


class LayerSettings:
    """The GPTQ settings each linear module loads with, None where it stays an nn.Linear.

    The checkpoint's tensor names, as transformers loads them, decide which modules are quantized where they are
    known (`shapes`, from the safetensors headers): GPTQ or packed tensors under the module's name, quantized; a
    `weight`, float (optimum's `modules_in_block_to_quantize` and GPTQModel's "-:" rules leave modules so). Where
    they are not (no headers) the config decides, and transformers' default skips (the output head) stay float unless
    the config says the head is quantized (GPTQModel's lm_head). `skipped`: the caller's modules_to_not_convert, always
    float (refused where the checkpoint holds them quantized). The settings themselves come from the rules
    (`dynamic`), matched against the checkpoint's own names (`checkpoint_names`: {name as loaded: as stored}). A
    module whose weight the model ties to another's (`tied`: an output head sharing the input embeddings) cannot be
    quantized: refused, naming it."""

    def __init__(self, rules: ModuleRules, shapes: dict, skipped, default_skips, tied=(), checkpoint_names=None):
        self.rules, self.shapes, self.skipped, self.default_skips, self.tied = rules, shapes, skipped, default_skips, tied
        self.quantized = quantized_layer_names(shapes)  # the layers the checkpoint holds quantized
        # The rules match the names the checkpoint was written with, which transformers may rename on load.
        self.original = {loaded.rpartition(".")[0]: name.rpartition(".")[0]
                         for loaded, name in (checkpoint_names or {}).items() if loaded != name}

    def stored_quantized(self, name: str):
        """True / False where the checkpoint holds the module quantized / in float, None where it does not say."""
        if name in self.quantized:
            return True
        return False if f"{name}.weight" in self.shapes else None

    def __call__(self, name: str):
        stored = self.stored_quantized(name)
        if is_excluded_module(name, self.skipped):
            if stored:  # a float module would load nothing of it
                raise GPTQFormatError(f"layer {name}: the checkpoint holds it quantized, but modules_to_not_convert "
                                      f"(or the model's keep_in_fp32_modules) keeps it float: {sorted(self.skipped)}")
            return None
        if stored is False or (stored is None and is_excluded_module(name, self.default_skips) and not self.rules.lm_head):
            return None
        if name in self.tied:
            if stored:
                raise GPTQFormatError(f"layer {name}: the checkpoint holds it quantized, but the model ties its weight to "
                                      "another module's (tie_word_embeddings=true); hf_int4 quantizes only an untied head")
            return None
        name = self.original.get(name, name)
        return self.rules.stored_config(name) if stored else self.rules.config_for(name)


def cast_renamed_float_parameters(model, names):
    """After loading: the float parameters among `names` (checkpoint tensors transformers renamed on load) in the
    model's dtype. transformers 5.17 loads a pre-quantized checkpoint's renamed tensors in their stored dtype (taking
    the renaming for a deserialisation), e.g. Mixtral's router (block_sparse_moe.gate -> mlp.gate): in a float32
    checkpoint loaded as float16 it stays float32 and the first call fails. 5.25 casts them itself."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ()) | set(
        getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    params = dict(model.named_parameters())
    for name in names:
        param = params.get(name)
        if (param is not None and param.is_floating_point() and param.dtype != model.dtype
                and not any(module in name for module in keep)):
            param.data = param.data.to(model.dtype)


def check_checkpoint_tensors(model, shapes):
    """Before loading: every tensor each HfInt4Linear expects is in the checkpoint (`shapes`, from the safetensors
    headers) with its shape.

    transformers would otherwise leave a missing tensor uninitialised (a warning, then garbage output). The names are
    as transformers loads them (its renaming applied), so where they line up with the model's, a layer none of whose
    tensors appear is missing too. A missing g_idx is allowed: finalize() derives it as k // group_size, as GPTQ
    readers do."""
    if not shapes:
        return
    layers = [(name, module, {f"{name}.{buf}": tuple(t.shape) for buf, t in module.named_buffers(recurse=False)})
              for name, module in model.named_modules() if isinstance(module, HfInt4Linear)]
    # Where no layer's tensors appear under its name, transformers maps the names itself (a base model loaded from a
    # checkpoint of the model with a head, a key_mapping), and its loading report names what it does not find.
    names_line_up = any(key in shapes for _, _, expected in layers for key in expected)
    for name, module, expected in layers:
        if not any(key in shapes for key in expected):
            if not names_line_up:
                continue
            qweight = next(key for key in expected if key.endswith("qweight"))
            raise GPTQFormatError(f"layer {name}: the checkpoint has none of its tensors (no {qweight}), yet the "
                                  "quantization config quantizes it")
        for key, shape in expected.items():
            if key not in shapes:
                if key.endswith(".g_idx"):
                    module.derive_g_idx = True
                    continue
                raise GPTQFormatError(f"layer {name}: the checkpoint has no {key} (expected shape {shape})")
            if shapes[key] != shape:
                cfg = module.config
                raise GPTQFormatError(
                    f"layer {name}: {key} has shape {shapes[key]} in the checkpoint, expected {shape} for "
                    f"in_features={module.in_features}, out_features={module.out_features}, "
                    f"group_size={cfg.group_size}"
                )


def check_every_quantized_expert_taken(model, untaken):
    """Before loading: no quantized MoE expert layer among the checkpoint's quantized layers that no HfInt4Linear
    takes (`untaken`): transformers would report their tensors unexpected and leave the experts at random (a model
    that runs and answers garbage). split_quantized_experts has made a linear per expert where the model holds its
    experts fused; what is left has names no module of the model has."""
    for prefix in sorted(untaken):
        if ".experts." in f".{prefix}.":
            raise GPTQFormatError(
                f"layer {prefix}: the checkpoint holds quantized MoE experts, but no linear layer of this model "
                f"({type(model).__name__}) has that name"
            )


_transformers_merge = AutoHfQuantizer.merge_quantization_configs.__func__


def _merge_quantization_configs(cls, quantization_config, quantization_config_from_args):
    if isinstance(quantization_config_from_args, HfInt4Config):
        checkpoint = quantization_config if isinstance(quantization_config, dict) else quantization_config.to_dict()
        if checkpoint.get("quant_method") == "gptq":
            return HfInt4Config.from_gptq_dict(
                checkpoint, modules_to_not_convert=quantization_config_from_args.modules_to_not_convert,
                fuse_projections=quantization_config_from_args.fuse_projections,
            )
        if checkpoint.get("quant_method") == QUANT_METHOD:  # a packed checkpoint: its layout, the caller's choice
            merged = HfInt4Config.from_dict(checkpoint)
            merged.fuse_projections = quantization_config_from_args.fuse_projections
            return merged
    return _transformers_merge(cls, quantization_config, quantization_config_from_args)


AutoHfQuantizer.merge_quantization_configs = classmethod(_merge_quantization_configs)
