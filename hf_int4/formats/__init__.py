"""GPTQ checkpoint format: config, per-layer tensors, reader (and, in gptq_writer, a writer for fixtures)."""
from hf_int4.formats.gptq import (
    GPTQConfig,
    GPTQFormatError,
    GPTQLayer,
    ModuleRules,
    iter_gptq_layers,
    load_gptq_config,
    load_module_rules,
    read_gptq_checkpoint,
    unpack_int4_cols,
    unpack_int4_rows,
)

__all__ = [
    "GPTQConfig",
    "GPTQFormatError",
    "GPTQLayer",
    "ModuleRules",
    "iter_gptq_layers",
    "load_gptq_config",
    "load_module_rules",
    "read_gptq_checkpoint",
    "unpack_int4_cols",
    "unpack_int4_rows",
]
