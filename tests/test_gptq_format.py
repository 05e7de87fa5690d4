"""GPTQ config parsing, bit-level packing, checkpoint reading and validation.

The oracle for every round trip is computed here from the unpacked integers, and the bit layout is
checked against words built by hand, so the writer and reader cannot be consistently wrong together.
"""
import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from gptq_oracle import weight_from_ints
from hf_int4.formats import (
    GPTQConfig,
    GPTQFormatError,
    GPTQLayer,
    iter_gptq_layers,
    load_gptq_config,
    read_gptq_checkpoint,
    unpack_int4_cols,
    unpack_int4_rows,
)
from hf_int4.formats.gptq_writer import pack_gptq_tensors
from hf_int4.reference import dequantize_gptq

FORMATS = ("gptq", "gptq_v2")
GROUP_SIZES = (32, 64, 128, -1)


def signed32(u: int) -> int:
    """The int32 with the bits of the uint32 u."""
    return u - (1 << 32) if u >= (1 << 31) else u


def random_ints(K, N, cfg: GPTQConfig, gen):
    """Unpacked GPTQ integers drawn here, independently of the writer's own random layers."""
    G = 1 if cfg.group_size == -1 else -(-K // cfg.group_size)
    gs = K if cfg.group_size == -1 else cfg.group_size
    intweight = torch.randint(0, 16, (K, N), generator=gen, dtype=torch.int32)
    if cfg.sym:
        zeros = torch.full((G, N), 8, dtype=torch.int32)
    elif cfg.checkpoint_format == "gptq":
        zeros = torch.randint(1, 17, (G, N), generator=gen, dtype=torch.int32)  # 16 is stored as nibble 15
    else:
        zeros = torch.randint(0, 16, (G, N), generator=gen, dtype=torch.int32)
    scales = (torch.rand(G, N, generator=gen) * 0.02 + 0.001).half()
    if cfg.desc_act:
        perm = torch.randperm(K, generator=gen)
        g_idx = torch.empty(K, dtype=torch.int32)
        g_idx[perm] = (torch.arange(K) // gs).int()
    else:
        g_idx = (torch.arange(K) // gs).int()
    return dict(intweight=intweight, zeros=zeros, scales=scales, g_idx=g_idx)


def write_ckpt(path, cfg, tensors, *, shards=1, where="config.json"):
    """A checkpoint dir as AutoGPTQ/optimum lay it out; shards > 1 splits tensors round-robin + index."""
    os.makedirs(path, exist_ok=True)
    if where == "config.json":
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"model_type": "llama", "quantization_config": cfg.to_dict()}, f)
    elif where == "quantize_config.json":
        with open(os.path.join(path, "quantize_config.json"), "w") as f:
            json.dump(cfg.to_dict(), f)
    keys = list(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"))
        return path
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[s::shards]}
        save_file(part, os.path.join(path, fname))
        weight_map.update(dict.fromkeys(part, fname))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return path


def layer_tensors(name, packed):
    return {f"{name}.{k}": v for k, v in packed.items()}


# ------------------------------------------------------------------------------------------------ config


def test_config_from_real_config_dicts():
    # optimum / transformers config.json
    c = GPTQConfig.from_dict(
        {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": True,
         "damp_percent": 0.1, "use_exllama": True, "tokenizer": None, "checkpoint_format": "gptq"}
    )
    assert c == GPTQConfig(group_size=128, sym=True, desc_act=True, checkpoint_format="gptq")
    # AutoGPTQ quantize_config.json: no quant_method / checkpoint_format -> v1
    c = GPTQConfig.from_dict(
        {"bits": 4, "group_size": 64, "damp_percent": 0.01, "desc_act": False, "static_groups": False,
         "sym": False, "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model"}
    )
    assert (c.group_size, c.sym, c.desc_act, c.checkpoint_format) == (64, False, False, "gptq")
    # GPTQModel writes "format"
    c = GPTQConfig.from_dict({"bits": 4, "group_size": -1, "sym": True, "desc_act": False, "format": "gptq_v2", "quant_method": "gptq"})
    assert (c.group_size, c.checkpoint_format) == (-1, "gptq_v2")
    assert GPTQConfig.from_dict(c.to_dict()) == c
    assert c.to_dict()["quant_method"] == "gptq"


@pytest.mark.parametrize("gs,K,G", [(128, 4096, 32), (128, 576, 5), (64, 576, 9), (32, 8, 1), (-1, 576, 1), (128, 64, 1)])
def test_num_groups(gs, K, G):
    assert GPTQConfig(group_size=gs).num_groups(K) == G


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_rejects_bits(bits):
    with pytest.raises(GPTQFormatError, match=f"4-bit GPTQ only.*bits={bits}"):
        GPTQConfig.from_dict({"quant_method": "gptq", "bits": bits, "group_size": 128})


@pytest.mark.parametrize(
    "d,pattern",
    [
        ({"bits": 4, "checkpoint_format": "marlin"}, "checkpoint_format='marlin'"),
        ({"bits": 4, "quant_method": "awq"}, "quant_method='awq'"),
        ({"bits": 4, "group_size": 100}, "group_size=100"),
        ({"bits": 4, "group_size": 0}, "group_size=0"),
        ({"bits": 4, "group_size": -2}, "group_size=-2"),
        ({"bits": 4, "checkpoint_format": "gptq", "format": "gptq_v2"}, "checkpoint_format='gptq' but format='gptq_v2'"),
    ],
)
def test_rejects_bad_config(d, pattern):
    with pytest.raises(GPTQFormatError, match=pattern):
        GPTQConfig.from_dict(d)


def test_load_config_prefers_config_json(tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"quantization_config": GPTQConfig(group_size=64).to_dict()}, f)
    with open(tmp_path / "quantize_config.json", "w") as f:
        json.dump(GPTQConfig(group_size=32).to_dict(), f)
    assert load_gptq_config(tmp_path).group_size == 64
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "llama"}, f)  # no quantization_config -> quantize_config.json
    assert load_gptq_config(tmp_path).group_size == 32


def test_missing_quantization_config(tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "llama"}, f)
    with pytest.raises(GPTQFormatError, match="quantization_config") as e:
        load_gptq_config(tmp_path)
    assert str(tmp_path) in str(e.value)


# ----------------------------------------------------------------------------------------- bit layout


def test_qweight_word_by_hand():
    # column 0 holds rows 0..7 = 1,2,...,7,15: the word is 0xF7654321 (row j in bits 4j..4j+3)
    col = [1, 2, 3, 4, 5, 6, 7, 15]
    intweight = torch.zeros(8, 8, dtype=torch.int32)
    intweight[:, 0] = torch.tensor(col)
    intweight[:, 3] = 9
    cfg = GPTQConfig(group_size=-1, sym=False, checkpoint_format="gptq_v2")
    zeros = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 15]], dtype=torch.int32)
    packed = pack_gptq_tensors(intweight, zeros, torch.ones(1, 8).half(), torch.zeros(8, dtype=torch.int32), cfg)
    word = 0
    for j, v in enumerate(col):
        word |= v << (4 * j)
    assert word == 0xF7654321
    assert packed["qweight"].dtype == torch.int32 and packed["qweight"].shape == (1, 8)
    assert packed["qweight"][0, 0].item() == signed32(0xF7654321)
    assert packed["qweight"][0, 3].item() == signed32(0x99999999)
    assert packed["qweight"][0, 1].item() == 0
    assert packed["qzeros"].shape == (1, 1)
    assert packed["qzeros"][0, 0].item() == signed32(0xF6543210)  # column 8c + j in nibble j


def test_unpack_by_hand_negative_words():
    w = torch.tensor([[signed32(0xF7654321), -1, 0, signed32(0x80000000)]], dtype=torch.int32)
    rows = unpack_int4_rows(w)
    assert rows.shape == (8, 4) and rows.dtype == torch.int32
    assert rows[:, 0].tolist() == [1, 2, 3, 4, 5, 6, 7, 15]
    assert rows[:, 1].tolist() == [15] * 8
    assert rows[:, 2].tolist() == [0] * 8
    assert rows[:, 3].tolist() == [0] * 7 + [8]
    cols = unpack_int4_cols(w)
    assert cols.shape == (1, 32)
    assert cols[0, :8].tolist() == [1, 2, 3, 4, 5, 6, 7, 15]
    assert cols[0, 24:].tolist() == [0] * 7 + [8]


def naive_pack(intweight, zeros_stored):
    """AutoGPTQ's pack loop, written out with Python ints."""
    K, N = intweight.shape
    qweight = [[0] * N for _ in range(K // 8)]
    for r in range(K // 8):
        for n in range(N):
            for j in range(8):
                qweight[r][n] |= int(intweight[8 * r + j, n]) << (4 * j)
    G = zeros_stored.shape[0]
    qzeros = [[0] * (N // 8) for _ in range(G)]
    for g in range(G):
        for c in range(N // 8):
            for j in range(8):
                qzeros[g][c] |= int(zeros_stored[g, 8 * c + j]) << (4 * j)
    to_t = lambda rows: torch.tensor([[signed32(v) for v in row] for row in rows], dtype=torch.int32)
    return to_t(qweight), to_t(qzeros)


@pytest.mark.parametrize("fmt", FORMATS)
def test_pack_matches_naive_loop(fmt):
    gen = torch.Generator().manual_seed(1)
    cfg = GPTQConfig(group_size=32, sym=False, checkpoint_format=fmt)
    raw = random_ints(64, 24, cfg, gen)
    packed = pack_gptq_tensors(raw["intweight"], raw["zeros"], raw["scales"], raw["g_idx"], cfg)
    stored = raw["zeros"] - 1 if fmt == "gptq" else raw["zeros"]
    qweight, qzeros = naive_pack(raw["intweight"], stored)
    assert torch.equal(packed["qweight"], qweight)
    assert torch.equal(packed["qzeros"], qzeros)


@pytest.mark.parametrize("fmt,nibble", [("gptq", 7), ("gptq_v2", 8)])
def test_sym_zero_storage(fmt, nibble):
    cfg = GPTQConfig(group_size=32, sym=True, checkpoint_format=fmt)
    raw = random_ints(64, 16, cfg, torch.Generator().manual_seed(0))
    packed = pack_gptq_tensors(raw["intweight"], raw["zeros"], raw["scales"], raw["g_idx"], cfg)
    word = sum(nibble << (4 * j) for j in range(8))
    assert (packed["qzeros"] == signed32(word)).all()
    layer = GPTQLayer.from_tensors("l", packed, cfg)
    assert (layer.int_zeros() == 8).all()


def test_v1_stored_15_means_zero_16():
    cfg = GPTQConfig(group_size=-1, sym=False, checkpoint_format="gptq")
    qweight = torch.zeros(1, 8, dtype=torch.int32)  # all q = 0
    qzeros = torch.tensor([[signed32(0xF0000000)]], dtype=torch.int32)  # column 7 stores 15, others 0
    scales = torch.full((1, 8), 0.5).half()
    layer = GPTQLayer.from_tensors("l", {"qweight": qweight, "qzeros": qzeros, "scales": scales}, cfg)
    assert layer.int_zeros()[0].tolist() == [1] * 7 + [16]
    w = dequantize_gptq(layer)
    assert w[:, 7].tolist() == [-8.0] * 8 and w[:, 0].tolist() == [-0.5] * 8
    # the same word read as v2 is the raw nibbles
    v2 = GPTQLayer.from_tensors("l", {"qweight": qweight, "qzeros": qzeros, "scales": scales}, GPTQConfig(group_size=-1, sym=False, checkpoint_format="gptq_v2"))
    assert v2.int_zeros()[0].tolist() == [0] * 7 + [15]


# ------------------------------------------------------------------------------------------ round trip

SHAPES = [(576, 1536), (576, 192), (64, 32)]


@pytest.mark.parametrize("gs", GROUP_SIZES)
@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_through_checkpoint(tmp_path, fmt, sym, desc_act, gs):
    cfg = GPTQConfig(group_size=gs, sym=sym, desc_act=desc_act, checkpoint_format=fmt)
    gen = torch.Generator().manual_seed(1000 * FORMATS.index(fmt) + 100 * sym + 10 * desc_act + GROUP_SIZES.index(gs))
    tensors, raws = {}, {}
    for i, (K, N) in enumerate(SHAPES):
        name = f"model.layers.{i}.mlp.up_proj"
        raws[name] = random_ints(K, N, cfg, gen)
        r = raws[name]
        packed = pack_gptq_tensors(r["intweight"], r["zeros"], r["scales"], r["g_idx"], cfg)
        if i == 1:
            packed["bias"] = torch.randn(N, generator=gen).half()
            r["bias"] = packed["bias"]
        tensors.update(layer_tensors(name, packed))
    tensors["model.norm.weight"] = torch.randn(64, generator=gen).bfloat16()
    tensors["model.norm.bias"] = torch.randn(64, generator=gen)  # a .bias that belongs to no quantized layer
    tensors["model.norm.scales"] = torch.randn(8, generator=gen)  # nor does a lone .scales
    shards = 2 if desc_act else 1
    write_ckpt(tmp_path / "ckpt", cfg, tensors, shards=shards, where="config.json" if sym else "quantize_config.json")

    got_cfg, layers, others = read_gptq_checkpoint(tmp_path / "ckpt")
    assert got_cfg == cfg
    assert set(layers) == set(raws)
    assert set(others) == {"model.norm.weight", "model.norm.bias", "model.norm.scales"}
    assert others["model.norm.weight"].dtype == torch.bfloat16
    assert torch.equal(others["model.norm.weight"], tensors["model.norm.weight"])
    for name, r in raws.items():
        layer = layers[name]
        K, N = r["intweight"].shape
        assert (layer.in_features, layer.out_features, layer.num_groups) == (K, N, r["scales"].shape[0])
        assert layer.num_groups == (1 if gs == -1 else math.ceil(K / gs))
        assert torch.equal(layer.int_weight(), r["intweight"])
        assert torch.equal(layer.int_zeros(), r["zeros"])
        assert torch.equal(layer.g_idx, r["g_idx"])
        deq = dequantize_gptq(layer)
        assert deq.dtype == torch.float32 and deq.shape == (K, N)
        assert torch.equal(deq, weight_from_ints(r, torch.float32))
        if "bias" in r:
            assert torch.equal(layer.bias, r["bias"])
        else:
            assert layer.bias is None
    streamed = {layer.name: layer for layer in iter_gptq_layers(tmp_path / "ckpt")}
    assert set(streamed) == set(raws)
    for name in raws:
        assert torch.equal(streamed[name].qweight, layers[name].qweight)


def test_from_tensors_derives_g_idx_and_converts_dtypes():
    cfg = GPTQConfig(group_size=32, sym=False, checkpoint_format="gptq_v2")
    raw = random_ints(96, 16, cfg, torch.Generator().manual_seed(3))
    packed = pack_gptq_tensors(raw["intweight"], raw["zeros"], raw["scales"], raw["g_idx"], cfg)
    layer = GPTQLayer.from_tensors("l", {"qweight": packed["qweight"], "qzeros": packed["qzeros"], "scales": raw["scales"].float()}, cfg)
    assert layer.g_idx.dtype == torch.int32 and layer.g_idx.tolist() == [k // 32 for k in range(96)]
    assert layer.scales.dtype == torch.float32  # kept: packing rounds it once, into the activation dtype
    scales64 = {**packed, "scales": raw["scales"].double()}
    assert GPTQLayer.from_tensors("l", scales64, cfg).scales.dtype == torch.float32  # a dtype packing does not take
    assert torch.equal(dequantize_gptq(layer), weight_from_ints(raw, torch.float32))
    layer = GPTQLayer.from_tensors("l", {**packed, "g_idx": packed["g_idx"].long()}, cfg)
    assert layer.g_idx.dtype == torch.int32


# ---------------------------------------------------------------------------------------------- errors

NAME = "model.layers.0.mlp.up_proj"


def good_packed(cfg=GPTQConfig(group_size=32, sym=False, checkpoint_format="gptq_v2"), K=64, N=16, seed=0):
    raw = random_ints(K, N, cfg, torch.Generator().manual_seed(seed))
    return pack_gptq_tensors(raw["intweight"], raw["zeros"], raw["scales"], raw["g_idx"], cfg), cfg


def expect_error(tensors, cfg, *patterns):
    with pytest.raises(GPTQFormatError) as e:
        GPTQLayer.from_tensors(NAME, tensors, cfg)
    msg = str(e.value)
    assert NAME in msg, msg
    for p in patterns:
        assert p in msg, msg
    return msg


@pytest.mark.parametrize("fmt,stored", [("gptq", 4), ("gptq_v2", 5)])
def test_sym_with_asymmetric_zeros(fmt, stored):
    cfg = GPTQConfig(group_size=32, sym=True, checkpoint_format=fmt)
    packed, _ = good_packed(cfg)
    qzeros = packed["qzeros"].clone()
    nib = 3  # column 3 of word 0 in group 1
    qzeros[1, 0] = (qzeros[1, 0] & ~(0xF << (4 * nib))) | (stored << (4 * nib))
    expect_error({**packed, "qzeros": qzeros}, cfg, "sym=True", "found zero 5 at group 1, column 3")


def test_missing_tensor_in_checkpoint(tmp_path):
    packed, cfg = good_packed()
    tensors = layer_tensors(NAME, packed)
    del tensors[f"{NAME}.qzeros"]
    write_ckpt(tmp_path, cfg, tensors)
    with pytest.raises(GPTQFormatError, match=rf"{NAME}.*{NAME}\.qzeros"):
        read_gptq_checkpoint(tmp_path)
    for missing in ("qweight", "scales"):
        tensors = {k: v for k, v in layer_tensors(NAME, packed).items() if not k.endswith(missing)}
        tensors["model.other.scales"] = torch.ones(4)  # a lone .scales is an ordinary tensor, not a layer
        write_ckpt(tmp_path / missing, cfg, tensors)
        with pytest.raises(GPTQFormatError, match=rf"layer {NAME}: .* no {NAME}\.{missing}"):
            read_gptq_checkpoint(tmp_path / missing)
    packed.pop("qzeros")
    expect_error(packed, cfg, "qzeros")


def test_wrong_qweight_shape():
    packed, cfg = good_packed()
    msg = expect_error({**packed, "qweight": packed["qweight"][:-1]}, cfg, "qweight")
    assert "g_idx" in msg  # K from qweight (56) disagrees with g_idx (64)
    expect_error({**packed, "qweight": packed["qweight"].flatten()}, cfg, "qweight", "2-D")


def test_wrong_scales_shape():
    packed, cfg = good_packed()
    expect_error({**packed, "scales": packed["scales"][:, :8]}, cfg, "scales", "(2, 8)", "expected (2, 16)")
    expect_error({**packed, "scales": packed["scales"][:1]}, cfg, "scales", "group_size=32")


def test_wrong_qzeros_shape_and_dtype():
    packed, cfg = good_packed()
    expect_error({**packed, "qzeros": packed["qzeros"][:, :1]}, cfg, "qzeros", "(2, 1)")
    expect_error({**packed, "qweight": packed["qweight"].to(torch.int64)}, cfg, "qweight", "int32", "int64")


def test_g_idx_out_of_range():
    cfg = GPTQConfig(group_size=32, sym=False, desc_act=True, checkpoint_format="gptq_v2")
    packed, _ = good_packed(cfg)
    g = packed["g_idx"].clone()
    g[5] = 2
    expect_error({**packed, "g_idx": g}, cfg, "g_idx[5]=2", "out of range", "[0, 2)")
    g[5] = -1
    expect_error({**packed, "g_idx": g}, cfg, "g_idx[5]=-1")


def test_desc_act_false_with_permuted_g_idx():
    packed, cfg = good_packed()
    assert not cfg.desc_act
    g = packed["g_idx"].clone()
    g[[0, 40]] = g[[40, 0]]
    expect_error({**packed, "g_idx": g}, cfg, "desc_act=False", "g_idx[0]=1")
    # the same tensors are fine when the checkpoint says desc_act
    GPTQLayer.from_tensors(NAME, {**packed, "g_idx": g}, GPTQConfig(group_size=32, sym=False, desc_act=True, checkpoint_format="gptq_v2"))


def test_k_not_multiple_of_8():
    packed, cfg = good_packed()
    expect_error({**packed, "g_idx": torch.zeros(60, dtype=torch.int32)}, cfg, "g_idx", "multiple of 8")
    # the writer refuses K % 8 != 0 up front (covered with the layer name in test_gptq_writer too)
    with pytest.raises(GPTQFormatError, match=rf"{NAME}.*K=60"):
        pack_gptq_tensors(torch.zeros(60, 16, dtype=torch.int32), torch.full((2, 16), 8), torch.ones(2, 16).half(),
                          torch.arange(60) // 32, cfg, name=NAME)


def test_n_not_multiple_of_8():
    cfg = GPTQConfig(group_size=32, sym=False, checkpoint_format="gptq_v2")
    t = {"qweight": torch.zeros(8, 12, dtype=torch.int32), "qzeros": torch.zeros(2, 1, dtype=torch.int32), "scales": torch.ones(2, 12).half()}
    expect_error(t, cfg, "N=12", "multiple of 8")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scales(bad):
    packed, cfg = good_packed()
    s = packed["scales"].clone()
    s[1, 7] = bad
    expect_error({**packed, "scales": s}, cfg, "scales[1, 7]", "not finite")


def test_wrong_bias_shape():
    packed, cfg = good_packed()
    expect_error({**packed, "bias": torch.zeros(15).half()}, cfg, "bias", "(15,)")


def test_orphan_g_idx_and_empty_dir(tmp_path):
    packed, cfg = good_packed()
    write_ckpt(tmp_path / "a", cfg, {"x.g_idx": packed["g_idx"], "y.weight": torch.zeros(2)})
    with pytest.raises(GPTQFormatError, match="layer x:.*x.qweight"):
        read_gptq_checkpoint(tmp_path / "a")
    os.makedirs(tmp_path / "b")
    with open(tmp_path / "b" / "quantize_config.json", "w") as f:
        json.dump(cfg.to_dict(), f)
    with pytest.raises(GPTQFormatError, match="safetensors"):
        read_gptq_checkpoint(tmp_path / "b")


def test_bad_config_in_checkpoint_dir(tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"quantization_config": {"quant_method": "gptq", "bits": 3, "group_size": 128}}, f)
    with pytest.raises(GPTQFormatError, match="bits=3"):
        read_gptq_checkpoint(tmp_path)


def test_validate_on_meta_checks_shapes_only():
    cfg = GPTQConfig(group_size=128)
    with torch.device("meta"):
        layer = GPTQLayer("m", torch.empty(16, 64, dtype=torch.int32), torch.empty(1, 8, dtype=torch.int32),
                          torch.empty(1, 64, dtype=torch.float16), torch.empty(128, dtype=torch.int32), None, cfg)
    assert layer.validate() is layer
    layer.scales = torch.empty(2, 64, dtype=torch.float16, device="meta")
    with pytest.raises(GPTQFormatError, match="layer m: scales"):
        layer.validate()


def test_marlin_serialized_checkpoint_is_refused():
    """AutoGPTQ <= 0.7 wrote Marlin-layout tensors (B, s) under quant_method "gptq"; read as GPTQ they would be no
    layers at all."""
    with pytest.raises(GPTQFormatError, match="is_marlin_format=true"):
        GPTQConfig.from_dict({"quant_method": "gptq", "bits": 4, "group_size": 128, "is_marlin_format": True})
    assert GPTQConfig.from_dict({"quant_method": "gptq", "is_marlin_format": False}).group_size == 128
