"""transformers integration: a GPTQ checkpoint loaded with HfInt4Config computes the dequantized model."""
import dataclasses
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import hf_int4
from hf_int4 import GPTQConfig, GPTQFormatError, HfInt4Config, HfInt4Linear
from hf_int4.formats.gptq_writer import tiny_llama_config, write_gptq_checkpoint
from hf_int4.reference import dequantize_gptq
from model_oracle import dequantized_float_model

VARIANTS = [
    GPTQConfig(group_size=128, sym=True, desc_act=False, checkpoint_format="gptq"),
    GPTQConfig(group_size=32, sym=False, desc_act=True, checkpoint_format="gptq_v2"),
    GPTQConfig(group_size=-1, sym=True, desc_act=True, checkpoint_format="gptq"),
    GPTQConfig(group_size=64, sym=False, desc_act=False, checkpoint_format="gptq_v2"),
]


def _write_tiny(tmp_path, config, seed=0):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config())
    out = str(tmp_path / "gptq")
    write_gptq_checkpoint(model, out, config, progress=False)
    return out


@pytest.mark.parametrize("config", VARIANTS, ids=lambda c: f"g{c.group_size}-sym{c.sym}-act{c.desc_act}-{c.checkpoint_format}")
def test_from_pretrained_matches_dequantized_model_cpu(tmp_path, config):
    checkpoint = _write_tiny(tmp_path, config)
    with pytest.warns(UserWarning, match="reference path"):
        hf_int4._extension.warn_reference_path_once.cache_clear()
        model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=HfInt4Config(), dtype=torch.float32)
    oracle, layers = dequantized_float_model(checkpoint)

    swapped = {n for n, m in model.named_modules() if isinstance(m, HfInt4Linear)}
    assert swapped == set(layers), "every quantized layer (and nothing else) becomes an HfInt4Linear"
    assert not isinstance(model.lm_head, HfInt4Linear)
    qc = model.config.quantization_config
    assert (qc.group_size, qc.sym, qc.desc_act, qc.checkpoint_format) == (
        config.group_size, config.sym, config.desc_act, config.checkpoint_format
    ), "HfInt4Config takes over the checkpoint's own GPTQ settings"

    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = model(ids).logits, oracle(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_generate_cpu(tmp_path):
    checkpoint = _write_tiny(tmp_path, VARIANTS[1])
    model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=HfInt4Config(), dtype=torch.float32)
    oracle, _ = dequantized_float_model(checkpoint)
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), oracle.generate(ids, **kwargs))


def test_checkpoint_with_unsupported_bits_names_the_setting(tmp_path):
    checkpoint = _write_tiny(tmp_path, VARIANTS[0])
    path = os.path.join(checkpoint, "config.json")
    cfg = json.load(open(path))
    cfg["quantization_config"]["bits"] = 3
    json.dump(cfg, open(path, "w"))
    with pytest.raises(GPTQFormatError, match="bits=3"):
        AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=HfInt4Config())


def test_float_checkpoint_is_refused(tmp_path):
    model = LlamaForCausalLM(tiny_llama_config())
    model.save_pretrained(tmp_path / "float")
    with pytest.raises(ValueError, match="no quantization_config.*a float checkpoint must be quantized with GPTQ first"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=HfInt4Config())


def test_other_quantization_configs_still_go_to_transformers():
    """The merge wrapper only acts for HfInt4Config + a GPTQ checkpoint."""
    from transformers.quantizers.auto import AutoHfQuantizer

    merged = AutoHfQuantizer.merge_quantization_configs({"quant_method": "hf_int4", "group_size": 64}, None)
    assert isinstance(merged, HfInt4Config) and merged.group_size == 64


@pytest.mark.parametrize("config", VARIANTS[:2], ids=["g128-sym-v1", "g32-asym-act-v2"])
def test_save_pretrained_writes_packed_checkpoint_that_reloads_cpu(tmp_path, config):
    checkpoint = _write_tiny(tmp_path, config)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=HfInt4Config(), dtype=torch.float16)
    saved = tmp_path / "packed"
    model.save_pretrained(saved)
    qc = json.load(open(saved / "config.json"))["quantization_config"]
    assert qc["quant_method"] == "hf_int4" and qc["weight_format"] == "packed" and qc["packed_dtype"] == "float16"
    from safetensors import safe_open

    with safe_open(str(saved / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.int4_qweight" in keys
    assert not any(k.endswith((".qweight", ".qzeros", ".g_idx")) for k in keys), "no GPTQ tensors in a packed checkpoint"

    reloaded = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float16)  # no quantization_config needed
    assert all(m.is_packed for m in reloaded.modules() if isinstance(m, HfInt4Linear))
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # both compute each layer in fp32 from the same fp16 scales: identical logits
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def _rewrite_checkpoint(checkpoint, edit):
    """Apply edit(dict of tensors) to a single-file checkpoint in place."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(checkpoint, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_names_the_layer(tmp_path):
    checkpoint = _write_tiny(tmp_path, VARIANTS[0])
    _rewrite_checkpoint(checkpoint, lambda t: t.pop("model.layers.1.mlp.up_proj.qzeros"))
    with pytest.raises(GPTQFormatError, match=r"layer model\.layers\.1\.mlp\.up_proj: the checkpoint has no .*qzeros"):
        AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=HfInt4Config())


def test_misshapen_tensor_names_the_layer(tmp_path):
    checkpoint = _write_tiny(tmp_path, VARIANTS[0])
    key = "model.layers.0.self_attn.o_proj.scales"
    _rewrite_checkpoint(checkpoint, lambda t: t.update({key: t[key][:, :64].contiguous()}))
    with pytest.raises(GPTQFormatError, match=r"layer model\.layers\.0\.self_attn\.o_proj: .*scales has shape"):
        AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=HfInt4Config())


def test_missing_g_idx_is_derived(tmp_path):
    checkpoint = _write_tiny(tmp_path, VARIANTS[0])  # no act-order: g_idx is k // group_size
    _rewrite_checkpoint(checkpoint, lambda t: [t.pop(k) for k in [k for k in t if k.endswith(".g_idx")]])
    model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=HfInt4Config(), dtype=torch.float32)
    oracle, _ = dequantized_float_model(_write_tiny(tmp_path / "again", VARIANTS[0]))
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, oracle(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights_file", ["safetensors", "bin"])
def test_stored_bf16_scales_and_int64_g_idx_load_as_stored(tmp_path, weights_file):
    """Checkpoints with bf16 scales (some writers) and int64 g_idx: the layers compute with the scales as stored (not
    through fp16, which flushes scales below 6e-5), and the g_idx loads as the reader takes it."""
    from safetensors.torch import load_file

    checkpoint = _write_tiny(tmp_path, VARIANTS[1])  # act-order: a g_idx that matters
    small = lambda t: (t.float() * 1e-3).to(torch.bfloat16)  # noqa: E731
    _rewrite_checkpoint(checkpoint, lambda t: t.update(
        {k: small(v) if k.endswith(".scales") else v.long() for k, v in t.items() if k.endswith((".scales", ".g_idx"))}))
    stored = load_file(os.path.join(checkpoint, "model.safetensors"))
    _, layers = dequantized_float_model(checkpoint)
    if weights_file == "bin":  # no header to read dtypes from
        torch.save(stored, os.path.join(checkpoint, "pytorch_model.bin"))
        os.remove(os.path.join(checkpoint, "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=HfInt4Config(), dtype=torch.float32)
    x = torch.randn(3, 1024, generator=torch.Generator().manual_seed(5))
    modules = dict(model.named_modules())
    for name, layer in layers.items():
        assert torch.equal(modules[name].scales.float(), stored[name + ".scales"].float()), name
        want = x[:, :layer.in_features].double() @ dequantize_gptq(layer).double()
        with torch.no_grad():
            torch.testing.assert_close(modules[name](x[:, :layer.in_features]).double(), want, rtol=1e-5, atol=1e-9)


def test_a_layer_missing_from_the_checkpoint_names_the_layer(tmp_path):
    checkpoint = _write_tiny(tmp_path, VARIANTS[0])
    prefix = "model.layers.1.self_attn.k_proj."
    _rewrite_checkpoint(checkpoint, lambda t: [t.pop(k) for k in [k for k in t if k.startswith(prefix)]])
    with pytest.raises(GPTQFormatError, match=r"layer model\.layers\.1\.self_attn\.k_proj: the checkpoint has none of "
                                              r"its tensors \(no model\.layers\.1\.self_attn\.k_proj\.qweight\)"):
        AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=HfInt4Config())


def test_a_checkpoint_with_only_quantize_config_json_is_explained(tmp_path):
    """Older AutoGPTQ checkpoints: the settings in quantize_config.json, none in config.json (transformers then takes
    the model for unquantized and would blame a pre_quantized argument nobody passed)."""
    checkpoint = _write_tiny(tmp_path, VARIANTS[0])
    with open(os.path.join(checkpoint, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(checkpoint, "quantize_config.json"), "w") as f:
        json.dump(config.pop("quantization_config"), f)
    with open(os.path.join(checkpoint, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=r"config\.json has no quantization_config.*hf-int4 repack"):
        AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=HfInt4Config())


def test_config_options_are_checked(monkeypatch):
    from hf_int4.integration import config

    assert HfInt4Config(modules_to_not_convert="down_proj").modules_to_not_convert == ["down_proj"]
    for bad in ({"fuse_projections": "false"}, {"lm_head": 1}, {"modules_to_not_convert": [3]}):
        with pytest.raises(ValueError, match="HfInt4Config: "):
            HfInt4Config(**bad)
    seen = []
    monkeypatch.setattr(config.logger, "warning", seen.append)
    assert HfInt4Config(fuse_projection=False).fuse_projections is True  # misspelt: ignored, but said
    HfInt4Config(quant_method="hf_int4")  # what from_dict passes back: not unknown
    assert seen == ["HfInt4Config: ignoring unknown argument(s) fuse_projection"], seen


@pytest.mark.parametrize("config", VARIANTS[:2], ids=["g128-sym", "g32-asym-act"])
def test_dequantize_gives_the_float_model_of_the_gptq_weights(tmp_path, config):
    checkpoint = _write_tiny(tmp_path, config)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=HfInt4Config(), dtype=torch.float32)
    oracle, layers = dequantized_float_model(checkpoint)
    model = model.dequantize()
    modules = dict(model.named_modules())
    for name, layer in layers.items():
        assert type(modules[name]) is torch.nn.Linear, name
        assert torch.equal(modules[name].weight, dequantize_gptq(layer).t()), name
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, oracle(ids).logits)


def test_base_model_loads_from_a_checkpoint_of_the_model_with_its_head(tmp_path):
    """AutoModel on a ...ForCausalLM checkpoint: transformers strips the "model." prefix itself; every layer loads."""
    from transformers import AutoModel

    checkpoint = _write_tiny(tmp_path, VARIANTS[0])
    full = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=HfInt4Config(), dtype=torch.float32)
    base = AutoModel.from_pretrained(checkpoint, quantization_config=HfInt4Config(), dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(base(ids).last_hidden_state, full.model(ids).last_hidden_state)


def test_dequantize_follows_the_dtype_the_model_was_converted_to(tmp_path):
    checkpoint = _write_tiny(tmp_path, VARIANTS[1])
    model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=HfInt4Config(), dtype=torch.float32)
    model = model.to(torch.bfloat16).dequantize()
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).logits.dtype == torch.bfloat16


def test_corrupt_sym_zeros_name_the_layer(tmp_path):
    checkpoint = _write_tiny(tmp_path, VARIANTS[0])
    key = "model.layers.0.mlp.down_proj.qzeros"
    _rewrite_checkpoint(checkpoint, lambda t: t[key].__setitem__((0, 0), 0x12345678))
    with pytest.raises(GPTQFormatError, match=r"layer model\.layers\.0\.mlp\.down_proj: checkpoint says sym=True"):
        AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=HfInt4Config())


def test_packed_view_follows_replaced_buffers():
    """The layer keeps its PackedInt4Weight view between calls, but never a stale one: whatever replaces
    a buffer (.to(), accelerate's offload hooks, re-registration) gives the next call the new tensors."""
    layer = HfInt4Linear(256, 128, False, GPTQConfig(group_size=128), dtype=torch.float16, packed=True)
    first = layer.packed_weight()
    assert layer.packed_weight() is first
    new_scales = torch.randn_like(layer.int4_scales)
    layer.int4_scales = new_scales  # what set_module_tensor_to_device does
    assert layer.packed_weight().scales is new_scales
    layer.to(torch.bfloat16)
    view = layer.packed_weight()
    assert view.scales.dtype == torch.bfloat16 and view.scales is layer.int4_scales and layer.dtype == torch.bfloat16
    assert view.qweight is layer.int4_qweight


def test_dtype_conversion_keeps_asymmetric_packed_layers_right():
    """Packed zeros hold magic + z for the scales' dtype: .to(bfloat16) and back re-express them; to float32 the
    packed scales and zeros stay as they are and the layer computes in float32 from them."""
    from hf_int4.formats.gptq_writer import random_gptq_layer
    from hf_int4.modules import pack_for_module, packed_state_dict

    cfg = GPTQConfig(group_size=64, sym=False, checkpoint_format="gptq_v2")
    gptq, _ = random_gptq_layer(256, 192, cfg, seed=7)
    layer = HfInt4Linear(256, 192, False, cfg, dtype=torch.float16, name="blk.proj", packed=True)
    layer.load_state_dict(packed_state_dict(pack_for_module(gptq, torch.float16), None))
    zeros = layer.int4_zeros.clone()
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(8))
    want = x.double() @ dequantize_gptq(gptq).double()
    for dtype in (torch.bfloat16, torch.float16):  # the scales keep bfloat16's rounding on the way back
        layer.to(dtype)
        assert layer.int4_scales.dtype == dtype == layer.int4_zeros.dtype == layer.dtype
        torch.testing.assert_close(layer(x.to(dtype)).double(), want, rtol=3e-2, atol=3e-2)
    assert torch.equal(layer.int4_zeros, zeros), "the zeros go fp16 -> bf16 -> fp16 exactly"
    scales = layer.int4_scales.clone()
    layer.float()
    assert torch.equal(layer.int4_zeros, zeros) and torch.equal(layer.int4_scales, scales)
    assert layer.int4_scales.dtype == layer.int4_zeros.dtype == torch.float16
    # the GPTQ tensors with the scales rounded as the bfloat16 round trip above rounded them
    rounded = dataclasses.replace(gptq, scales=gptq.scales.to(torch.bfloat16).to(torch.float16))
    want = x.double() @ dequantize_gptq(rounded).double()
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)
    # the layer says what it computes in (explain reports the reference path from it), through device moves too
    assert layer.dtype == torch.float32 and layer.to("cpu").dtype == torch.float32
    assert layer.reference_path_reason() == "it computes in torch.float32; the kernels take float16 and bfloat16"
    assert layer.to(torch.float16).dtype == torch.float16 and layer.int4_scales.dtype == torch.float16


def test_explain_names_the_reference_path_and_why(tmp_path):
    from hf_int4 import dispatch

    checkpoint = _write_tiny(tmp_path, VARIANTS[0])
    model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=HfInt4Config(), dtype=torch.float16)
    layer = model.model.layers[0].mlp.up_proj
    choice = dispatch.explain(layer, 1)
    assert choice.path == "reference" and "model.layers.0.mlp.up_proj: its weights are in GPTQ form" in choice.reason
    model.save_pretrained(tmp_path / "packed")
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "packed", quantization_config=HfInt4Config())
    choice = dispatch.explain(packed.model.layers[0].mlp.up_proj, 1)
    assert choice.path == "reference" and "its weights are on cpu" in choice.reason, choice


def test_save_after_a_dtype_conversion_records_the_dtype_the_layers_were_packed_for_cpu(tmp_path):
    """GPTQ-form layers (the CPU path) converted with .to(bfloat16) are saved packed for bfloat16, the dtype the
    checkpoint records: the reloaded model computes the dequantized model (not zeros packed for float16 read back
    as bfloat16)."""
    checkpoint = _write_tiny(tmp_path, VARIANTS[1])  # asymmetric: the zeros depend on the packed dtype
    model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=HfInt4Config(), dtype=torch.float16)
    model.to(torch.bfloat16)
    assert {m.dtype for m in model.modules() if isinstance(m, HfInt4Linear)} == {torch.bfloat16}
    model.save_pretrained(tmp_path / "packed")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    assert reloaded.dtype == torch.bfloat16
    oracle, _ = dequantized_float_model(checkpoint)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, want = reloaded(ids).logits.float(), oracle(ids).logits
    assert ((got - want).norm() / want.norm()).item() < 1e-2  # bfloat16 rounding only


@pytest.mark.parametrize("packed", [False, True], ids=["gptq-form", "packed"])
def test_save_of_a_float32_model_is_refused_before_anything_is_written(tmp_path, packed):
    """Packed checkpoints hold float16 / bfloat16 scales: a model converted to float32 is refused at saving, not
    written as a checkpoint whose packed_dtype no load accepts."""
    checkpoint = _write_tiny(tmp_path, VARIANTS[0])  # symmetric: .to(float32) is allowed for packed layers too
    if packed:
        AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=HfInt4Config(),
                                             dtype=torch.float16).save_pretrained(tmp_path / "packed")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    else:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=HfInt4Config(), dtype=torch.float16)
    model.to(torch.float32)
    before = model.config.quantization_config.to_dict()
    with pytest.raises(ValueError, match=r"float16 or bfloat16 .*torch\.float32"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()
    assert model.config.quantization_config.to_dict() == before


def test_whole_model_to_float32_computes_the_dequantized_model(tmp_path):
    """A packed asymmetric model moved to float32 converts every module (none is left behind in float16) and its
    quantized layers compute in float32 from the packed weights, which the round trip back to float16 leaves as they
    were loaded."""
    checkpoint = _write_tiny(tmp_path, VARIANTS[1])
    AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=HfInt4Config(),
                                         dtype=torch.float16).save_pretrained(tmp_path / "packed")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(6))
    packed = {k: v.clone() for k, v in model.state_dict().items() if ".int4_" in k}
    with torch.no_grad():
        model.to(torch.float32)
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        got = model(ids).logits
        oracle, layers = dequantized_float_model(checkpoint)
        for name, param in oracle.named_parameters():  # the float tensors as the float16 model saved them
            if name.removesuffix(".weight") not in layers:
                param.data = param.data.half().float()
        torch.testing.assert_close(got, oracle(ids).logits, rtol=1e-4, atol=1e-4)
    model.to(torch.float16)
    after = {k: v for k, v in model.state_dict().items() if ".int4_" in k}
    assert packed.keys() == after.keys() and all(torch.equal(packed[k], after[k]) for k in packed)
