"""The integration tests' model-level oracle: the float Llama whose quantized layers hold the fp32 weights their GPTQ
tensors stand for (read by hf_int4.formats and dequantized by hf_int4.reference, both checked against
tests/gptq_oracle.py), every other tensor as the checkpoint holds it."""
from transformers import LlamaForCausalLM

from hf_int4.formats.gptq import read_gptq_checkpoint
from hf_int4.formats.gptq_writer import tiny_llama_config
from hf_int4.reference import dequantize_gptq


def dequantized_state(checkpoint):
    """(state dict, {name: GPTQLayer}): every quantized layer's `weight` as the fp32 [N, K] its GPTQ tensors stand for,
    every other tensor as the checkpoint holds it, under the checkpoint's names."""
    _, layers, others = read_gptq_checkpoint(checkpoint)
    state = dict(others)
    for name, layer in layers.items():
        state[name + ".weight"] = dequantize_gptq(layer).t().contiguous()
    return state, layers


def dequantized_float_model(checkpoint, config=None):
    """(model in eval mode, {name: GPTQLayer}) for a checkpoint of a tiny_llama_config() model (or of `config`)."""
    state, layers = dequantized_state(checkpoint)
    model = LlamaForCausalLM(config or tiny_llama_config())
    model.load_state_dict(state, strict=True)
    return model.eval(), layers


def dequantized_float_checkpoint(checkpoint, out_dir):
    """A float checkpoint of any model (MoE included): the GPTQ checkpoint's quantized layers as the fp32 weights
    their tensors stand for, under the checkpoint's own names, every other tensor as it holds it, its config without
    quantization. transformers loads it as it loads the original float checkpoint (merging per-expert weights into
    its fused experts by its own conversion mapping), so the oracle shares no code with hf_int4's model path."""
    import json
    import os

    from safetensors.torch import save_file

    state, _ = dequantized_state(checkpoint)
    os.makedirs(out_dir)
    save_file(state, os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(checkpoint, "config.json")) as f:
        config = json.load(f)
    config.pop("quantization_config")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f)
    return out_dir
