"""Per-module settings of GPTQ checkpoints: GPTQModel's `dynamic` rules and quantized `lm_head`, and modules a
checkpoint leaves in float (optimum's `modules_in_block_to_quantize`), through the reader, `from_pretrained`,
save_pretrained and `hf-int4 repack`."""
import json
import os

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from hf_int4 import GPTQConfig, GPTQFormatError, HfInt4Config, HfInt4Linear
from hf_int4.cli import main as cli
from hf_int4.formats import ModuleRules, read_gptq_checkpoint
from hf_int4.formats.gptq_writer import tiny_llama_config, write_gptq_checkpoint
from model_oracle import dequantized_float_model

BASE = GPTQConfig(group_size=64, sym=True, desc_act=False, checkpoint_format="gptq")
# layer 0's o_proj stays float; layer 1's MLP: group 32, asymmetric, act-order; the rest of layer 1: group 128; the rest:
# BASE. The first matching rule decides, and sorting the rules (as json.dump(sort_keys=True) would) puts layer 1's
# rule before its MLP's.
DYNAMIC = {
    r"-:model\.layers\.0\.self_attn\.o_proj": {},
    r"+:model\.layers\.1\.mlp\.": {"group_size": 32, "sym": False, "desc_act": True, "damp_percent": 0.05},
    r"+:model\.layers\.1\.": {"group_size": 128},
}


def test_rules_first_match_decides_and_matches_from_the_start():
    rules = ModuleRules(BASE, {r"-:.*\.k_proj": {}, r".*_proj": {"group_size": 128}, r"mlp": {"group_size": 32}})
    assert rules.config_for("model.layers.3.self_attn.k_proj") is None
    assert rules.config_for("model.layers.3.self_attn.q_proj").group_size == 128
    assert rules.config_for("model.layers.3.mlp.fc1") == BASE, "'mlp' must match at the start of the name"
    assert rules.config_for("mlp.fc1").group_size == 32
    assert ModuleRules(BASE).config_for("anything") == BASE


def test_rule_with_unsupported_settings_names_the_layer_and_the_rule():
    rules = ModuleRules(BASE, {r"+:.*down_proj": {"bits": 8}})
    with pytest.raises(GPTQFormatError, match=r"layer model\.layers\.0\.mlp\.down_proj \(quantization_config dynamic "
                                              r"rule '\+:\.\*down_proj'\): .*4-bit .*bits=8"):
        rules.config_for("model.layers.0.mlp.down_proj")
    with pytest.raises(GPTQFormatError, match=r"dynamic rule '\(' is not a regular expression"):
        ModuleRules(BASE, {"(": {}})
    with pytest.raises(GPTQFormatError, match=r"int32 words; quantization_config has pack_dtype='int16'"):
        ModuleRules.from_dict({**BASE.to_dict(), "pack_dtype": "int16"})
    assert ModuleRules.from_dict({**BASE.to_dict(), "pack_dtype": "int32"}).base == BASE


def _write(tmp_path, dynamic=None, modules_to_not_convert=("lm_head",), tie=False, seed=0):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=tie))
    return write_gptq_checkpoint(model, str(tmp_path / "gptq"), BASE, dynamic=dynamic,
                                 modules_to_not_convert=modules_to_not_convert, progress=False)


def _logits(model, seed=1):
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits.float()


def _settings(model):
    return {n: (m.config.group_size, m.config.sym, m.config.desc_act) for n, m in model.named_modules()
            if isinstance(m, HfInt4Linear)}


def test_dynamic_checkpoint_loads_each_module_with_its_settings_cpu(tmp_path):
    checkpoint = _write(tmp_path, DYNAMIC)
    qc = json.load(open(os.path.join(checkpoint, "config.json")))["quantization_config"]
    assert qc["dynamic"] == DYNAMIC and "lm_head" not in qc
    oracle, layers = dequantized_float_model(checkpoint)
    assert {n: l.config.group_size for n, l in layers.items() if ".1.mlp." in n} == {
        f"model.layers.1.mlp.{p}": 32 for p in ("gate_proj", "up_proj", "down_proj")}
    assert layers["model.layers.1.self_attn.q_proj"].config.group_size == 128

    model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=HfInt4Config(), dtype=torch.float32)
    assert type(model.model.layers[0].self_attn.o_proj) is nn.Linear
    settings = _settings(model)
    assert set(settings) == set(layers)
    for name, got in settings.items():
        want = ((32, False, True) if name.startswith("model.layers.1.mlp.") else
                (128, True, False) if name.startswith("model.layers.1.") else (64, True, False))
        assert got == want, name
    torch.testing.assert_close(_logits(model), _logits(oracle), rtol=1e-5, atol=1e-5)


def test_modules_the_checkpoint_left_in_float_stay_float_cpu(tmp_path):
    """No rule says so (optimum's modules_in_block_to_quantize): the checkpoint's tensors do."""
    checkpoint = _write(tmp_path, modules_to_not_convert=("lm_head", "model.layers.1.self_attn.k_proj"))
    model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=HfInt4Config(), dtype=torch.float32)
    assert type(model.model.layers[1].self_attn.k_proj) is nn.Linear
    assert isinstance(model.model.layers[0].self_attn.k_proj, HfInt4Linear)
    oracle, _ = dequantized_float_model(checkpoint)
    torch.testing.assert_close(_logits(model), _logits(oracle), rtol=1e-5, atol=1e-5)


def test_quantized_lm_head_is_loaded_quantized_cpu(tmp_path):
    checkpoint = _write(tmp_path, modules_to_not_convert=())
    assert json.load(open(os.path.join(checkpoint, "config.json")))["quantization_config"]["lm_head"] is True
    model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=HfInt4Config(), dtype=torch.float32)
    assert isinstance(model.lm_head, HfInt4Linear)
    oracle, layers = dequantized_float_model(checkpoint)
    assert "lm_head" in layers
    torch.testing.assert_close(_logits(model), _logits(oracle), rtol=1e-5, atol=1e-5)
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), oracle.generate(ids, **kwargs))


def test_negative_rule_against_quantized_tensors_is_refused(tmp_path):
    checkpoint = _write(tmp_path)
    path = os.path.join(checkpoint, "config.json")
    cfg = json.load(open(path))
    cfg["quantization_config"]["dynamic"] = {r"-:.*\.o_proj": {}}
    json.dump(cfg, open(path, "w"))
    with pytest.raises(GPTQFormatError, match=r"layer model\.layers\.0\.self_attn\.o_proj: the checkpoint holds it "
                                              r"quantized, but .*dynamic rule '-:\.\*.*o_proj' says it is not"):
        AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=HfInt4Config())
    with pytest.raises(GPTQFormatError, match=r"layer model\.layers\.0\.self_attn\.o_proj: the checkpoint holds it"):
        read_gptq_checkpoint(checkpoint)


def test_unsupported_rule_is_refused_naming_the_layer_before_loading(tmp_path):
    checkpoint = _write(tmp_path)
    path = os.path.join(checkpoint, "config.json")
    cfg = json.load(open(path))
    cfg["quantization_config"]["dynamic"] = {r".*\.1\.mlp\.down_proj": {"bits": 8}}
    json.dump(cfg, open(path, "w"))
    with pytest.raises(GPTQFormatError, match=r"layer model\.layers\.1\.mlp\.down_proj \(quantization_config dynamic "
                                              r"rule .*bits=8"):
        AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=HfInt4Config())


def test_packed_checkpoints_keep_the_per_module_settings_cpu(tmp_path):
    """save_pretrained and `hf-int4 repack` write packed checkpoints that reload with the same modules in float,
    the same settings per module and the same logits."""
    checkpoint = _write(tmp_path, DYNAMIC, modules_to_not_convert=())
    model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=HfInt4Config(), dtype=torch.float16)
    want = _logits(model)
    model.save_pretrained(tmp_path / "saved")
    assert cli(["repack", checkpoint, str(tmp_path / "repacked"), "--device", "cpu"]) == 0
    for packed in ("saved", "repacked"):
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / packed, dtype=torch.float16)
        assert reloaded.config.quantization_config.dynamic == [[p, v] for p, v in DYNAMIC.items()], packed
        assert type(reloaded.model.layers[0].self_attn.o_proj) is nn.Linear, packed
        assert isinstance(reloaded.lm_head, HfInt4Linear) and reloaded.lm_head.is_packed, packed
        assert _settings(reloaded) == _settings(model), packed
        assert torch.equal(_logits(reloaded), want), packed


def test_quantized_head_of_a_tied_model_is_refused(tmp_path):
    """The head shares the input embeddings' weight: quantizing it would change the embeddings too."""
    checkpoint = _write(tmp_path, modules_to_not_convert=(), tie=True)
    with pytest.raises(GPTQFormatError, match=r"layer lm_head: the checkpoint holds it quantized, but the model ties"):
        AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=HfInt4Config())


def test_inspect_names_the_rules(tmp_path, capsys):
    checkpoint = _write(tmp_path, DYNAMIC)
    assert cli(["inspect", checkpoint]) == 0
    text = capsys.readouterr().out
    # 2 layers x 7 linears, less layer 0's o_proj
    assert "quantized_layers: 13" in text and f"dynamic_rules: {', '.join(DYNAMIC)}" in text


def test_keeping_a_quantized_module_float_is_refused(tmp_path):
    """modules_to_not_convert on a module the checkpoint holds quantized would leave it with no weights."""
    checkpoint = _write(tmp_path)
    with pytest.raises(GPTQFormatError, match=r"layer model\.layers\.0\.self_attn\.o_proj: the checkpoint holds it "
                                              r"quantized, but modules_to_not_convert .*keeps it float"):
        AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=HfInt4Config(modules_to_not_convert=["o_proj"]))
