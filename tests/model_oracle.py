"""The integration tests' model-level oracle: the float Llama whose quantized layers hold the fp32 weights their GPTQ
tensors stand for (read by hf_int4.formats and dequantized by hf_int4.reference, both checked against
tests/gptq_oracle.py), every other tensor as the checkpoint holds it."""
from transformers import LlamaForCausalLM

from hf_int4.formats.gptq import read_gptq_checkpoint
from hf_int4.formats.gptq_writer import tiny_llama_config
from hf_int4.reference import dequantize_gptq


def dequantized_float_model(checkpoint, config=None):
    """(model in eval mode, {name: GPTQLayer}) for a checkpoint of a tiny_llama_config() model (or of `config`)."""
    _, layers, others = read_gptq_checkpoint(checkpoint)
    state = dict(others)
    for name, layer in layers.items():
        state[name + ".weight"] = dequantize_gptq(layer).t().contiguous()
    model = LlamaForCausalLM(config or tiny_llama_config())
    model.load_state_dict(state, strict=True)
    return model.eval(), layers
