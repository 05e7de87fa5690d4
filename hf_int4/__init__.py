"""hf_int4: fast 4-bit GPTQ inference in Hugging Face transformers at every batch size.

`import hf_int4` registers the `hf_int4` quantization method with transformers, so that
`AutoModelForCausalLM.from_pretrained(gptq_dir, quantization_config=HfInt4Config())` loads a GPTQ
checkpoint into our packed layout.
"""
from hf_int4._extension import extension_available
from hf_int4.formats import GPTQConfig, GPTQFormatError, GPTQLayer
from hf_int4.integration import HfInt4Config, HfInt4Quantizer
from hf_int4.modules import HfInt4Linear

__version__ = "0.1.0"
__all__ = [
    "GPTQConfig",
    "GPTQFormatError",
    "GPTQLayer",
    "HfInt4Config",
    "HfInt4Linear",
    "HfInt4Quantizer",
    "extension_available",
]
