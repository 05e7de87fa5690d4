"""RTN quantizer, packer errors, random layers and whole-model checkpoint writing."""
import json
import os

import pytest
import torch
from torch import nn

from hf_int4.formats import GPTQConfig, GPTQFormatError, iter_gptq_layers, load_gptq_config, read_gptq_checkpoint
from hf_int4.formats.files import ShardWriter
from hf_int4.formats.gptq_writer import (
    make_gptq_layer,
    pack_gptq_tensors,
    quantize_rtn,
    random_gptq_layer,
    tiny_llama_config,
    write_gptq_checkpoint,
)
from hf_int4.reference import dequantize_gptq

ALL_CONFIGS = [
    GPTQConfig(group_size=gs, sym=sym, desc_act=da, checkpoint_format=fmt)
    for fmt in ("gptq", "gptq_v2")
    for sym in (True, False)
    for da in (False, True)
    for gs in (32, 128, -1)
]


def ids(c):
    return f"{c.checkpoint_format}-{'sym' if c.sym else 'asym'}-{'act' if c.desc_act else 'seq'}-g{c.group_size}"


def deq(intweight, zeros, scales, g_idx):
    g = g_idx.long()
    return scales.float()[g] * (intweight - zeros[g]).float()


def rtn_bound(scales, g_idx):
    """|w - dequant| <= scale / 2, loosened for the fp16 rounding of the scale (<= 15 * 2^-11 of a step)."""
    return scales.float()[g_idx.long()] * 0.51 + 1e-7


# ------------------------------------------------------------------------------------------------ RTN


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=ids)
def test_rtn_error_bound_and_params(cfg):
    K, N = 352, 96
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(0)) * 0.05
    intweight, zeros, scales, g_idx = quantize_rtn(w, cfg, generator=torch.Generator().manual_seed(1))
    G = cfg.num_groups(K)
    assert intweight.shape == (K, N) and zeros.shape == (G, N) and scales.shape == (G, N) and g_idx.shape == (K,)
    assert (intweight.dtype, zeros.dtype, scales.dtype, g_idx.dtype) == (torch.int32, torch.int32, torch.float16, torch.int32)
    assert intweight.min() >= 0 and intweight.max() <= 15
    err = (w.t() - deq(intweight, zeros, scales, g_idx)).abs()
    assert (err <= rtn_bound(scales, g_idx)).all()
    # each group has group_size members (the last one the remainder), in row order or not
    counts = torch.bincount(g_idx.long(), minlength=G)
    gs = K if cfg.group_size == -1 else cfg.group_size
    assert counts[:-1].eq(gs).all() and counts[-1] == K - gs * (G - 1)
    if not cfg.desc_act:
        assert torch.equal(g_idx, (torch.arange(K) // gs).int())
    elif G > 1:
        assert not torch.equal(g_idx, (torch.arange(K) // gs).int())
    # GPTQ's find_params on each group, computed here in float64
    wt = w.t().double()
    for gi in range(G):
        x = wt[g_idx == gi]
        lo, hi = x.min(0).values.clamp(max=0), x.max(0).values.clamp(min=0)
        if cfg.sym:
            hi = torch.maximum(-lo, hi)
            lo = -hi
            assert zeros[gi].eq(8).all()
        else:
            assert torch.equal(zeros[gi].double(), torch.round(-lo / ((hi - lo) / 15)))
        torch.testing.assert_close(scales[gi].double(), ((hi - lo) / 15).half().double(), rtol=0, atol=0)


def test_rtn_given_permutation():
    K, N = 64, 8
    cfg = GPTQConfig(group_size=32, sym=False, checkpoint_format="gptq_v2")  # desc_act not needed with a perm
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(0))
    _, _, _, g_idx = quantize_rtn(torch.randn(N, K), cfg, act_order_perm=perm)
    for i in range(K):
        assert g_idx[perm[i]] == i // 32
    with pytest.raises(GPTQFormatError, match="layer q:.*permutation"):
        quantize_rtn(torch.randn(N, K), cfg, act_order_perm=torch.zeros(K, dtype=torch.long), name="q")


def test_rtn_recovers_planted_integers():
    # w = s * (q - z) with every (group, column) using both q = 0 and q = 15 and s a power of two:
    # min/max RTN must find exactly s and z, and then q.
    K, N, gs = 64, 16, 32
    gen = torch.Generator().manual_seed(4)
    q = torch.randint(0, 16, (K, N), generator=gen, dtype=torch.int32)
    q[0::gs], q[1::gs] = 0, 15
    z = torch.randint(0, 16, (2, N), generator=gen, dtype=torch.int32)
    s = 2.0 ** -torch.randint(4, 9, (2, N), generator=gen).float()
    g_idx = (torch.arange(K) // gs).int()
    w = (s[g_idx.long()] * (q - z[g_idx.long()]).float()).t()
    cfg = GPTQConfig(group_size=gs, sym=False, checkpoint_format="gptq_v2")
    intweight, zeros, scales, _ = quantize_rtn(w, cfg)
    assert torch.equal(scales.float(), s) and torch.equal(zeros, z) and torch.equal(intweight, q)


def test_rtn_all_zero_group():
    w = torch.zeros(8, 64)
    for cfg in (GPTQConfig(group_size=32), GPTQConfig(group_size=32, sym=False, checkpoint_format="gptq")):
        intweight, zeros, scales, g_idx = quantize_rtn(w, cfg)
        assert torch.isfinite(scales).all() and (scales > 0).all()
        assert deq(intweight, zeros, scales, g_idx).eq(0).all()


# -------------------------------------------------------------------------------------------- packing


def test_v1_refuses_true_zero_0():
    cfg = GPTQConfig(group_size=32, sym=False, checkpoint_format="gptq")
    zeros = torch.full((2, 16), 5, dtype=torch.int32)
    zeros[1, 9] = 0
    args = (torch.zeros(64, 16, dtype=torch.int32), zeros, torch.ones(2, 16).half(), (torch.arange(64) // 32).int())
    with pytest.raises(GPTQFormatError) as e:
        pack_gptq_tensors(*args, cfg, name="model.layers.3.mlp.down_proj")
    msg = str(e.value)
    for part in ("model.layers.3.mlp.down_proj", "true zero point of 0", "group 1, column 9", "gptq_v2"):
        assert part in msg, msg
    # v2 stores it fine
    v2 = GPTQConfig(group_size=32, sym=False, checkpoint_format="gptq_v2")
    assert make_gptq_layer("x", *args, v2).int_zeros()[1, 9] == 0


def test_zero_16_only_in_v1():
    zeros = torch.full((1, 8), 16, dtype=torch.int32)
    args = (torch.full((32, 8), 3, dtype=torch.int32), zeros, torch.ones(1, 8).half(), torch.zeros(32, dtype=torch.int32))
    v1 = GPTQConfig(group_size=32, sym=False, checkpoint_format="gptq")
    layer = make_gptq_layer("x", *args, v1)
    assert layer.qzeros[0, 0].item() == -1  # eight stored nibbles of 15
    assert dequantize_gptq(layer).eq(-13).all()
    with pytest.raises(GPTQFormatError, match="layer y: zero point 16 .*gptq_v2"):
        pack_gptq_tensors(*args, GPTQConfig(group_size=32, sym=False, checkpoint_format="gptq_v2"), name="y")


def test_pack_rejects_bad_shapes_and_values():
    cfg = GPTQConfig(group_size=32, sym=False, checkpoint_format="gptq_v2")
    z, s = torch.zeros(4, 8, dtype=torch.int32), torch.ones(4, 8).half()
    with pytest.raises(GPTQFormatError, match=r"layer l: in_features K=100 is not a multiple of 8"):
        pack_gptq_tensors(torch.zeros(100, 8, dtype=torch.int32), z, s, torch.arange(100) // 32, cfg, name="l")
    with pytest.raises(GPTQFormatError, match=r"layer l: out_features N=12"):
        pack_gptq_tensors(torch.zeros(96, 12, dtype=torch.int32), z, s, torch.arange(96) // 32, cfg, name="l")
    with pytest.raises(GPTQFormatError, match=r"layer l: intweight values must be in 0..15, found 0..16"):
        pack_gptq_tensors(torch.arange(96 * 8).reshape(96, 8) % 17, z[:3], s[:3], torch.arange(96) // 32, cfg, name="l")
    with pytest.raises(GPTQFormatError, match=r"layer l: shapes"):
        pack_gptq_tensors(torch.zeros(96, 8, dtype=torch.int32), z, s, torch.arange(96) // 32, cfg, name="l")
    with pytest.raises(GPTQFormatError, match="layer r: in_features K=100"):
        random_gptq_layer(100, 16, cfg, name="r")


@pytest.mark.parametrize("cfg", ALL_CONFIGS[::3], ids=ids)
def test_random_layer(cfg):
    layer, raw = random_gptq_layer(576, 1536, cfg, seed=9, with_bias=True, name="rl")
    assert layer.name == "rl" and layer.bias is not None and layer.bias.shape == (1536,)
    assert torch.equal(dequantize_gptq(layer), deq(raw["intweight"], raw["zeros"], raw["scales"], raw["g_idx"]))
    z = raw["zeros"]
    if cfg.sym:
        assert z.eq(8).all()
    elif cfg.checkpoint_format == "gptq":
        assert z.min() == 1 and z.max() == 16  # the whole storable v1 range, including 16
    else:
        assert z.min() == 0 and z.max() == 15
    again, raw2 = random_gptq_layer(576, 1536, cfg, seed=9, with_bias=True)
    assert torch.equal(again.qweight, layer.qweight) and torch.equal(raw2["scales"], raw["scales"])
    x = torch.randn(16, 576)
    y = x @ dequantize_gptq(layer)
    assert 0.2 < y.std() < 5  # scales chosen so outputs are O(1)


# -------------------------------------------------------------------------------------- whole checkpoint


def tiny_model(seed=0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


@pytest.mark.parametrize(
    "cfg",
    [
        GPTQConfig(group_size=128, sym=True, desc_act=False, checkpoint_format="gptq"),
        GPTQConfig(group_size=32, sym=False, desc_act=True, checkpoint_format="gptq_v2"),
        GPTQConfig(group_size=-1, sym=False, desc_act=False, checkpoint_format="gptq"),
        GPTQConfig(group_size=64, sym=True, desc_act=True, checkpoint_format="gptq_v2"),
    ],
    ids=ids,
)
def test_write_tiny_llama(tmp_path, cfg):
    model = tiny_model(attention_bias=cfg.desc_act)
    out = write_gptq_checkpoint(model, tmp_path / "ckpt", cfg, progress=False)
    assert out == str(tmp_path / "ckpt")
    assert load_gptq_config(out) == cfg
    with open(os.path.join(out, "config.json")) as f:
        cfg_json = json.load(f)
    with open(os.path.join(out, "quantize_config.json")) as f:
        qc_json = json.load(f)
    assert cfg_json["model_type"] == "llama" and cfg_json["intermediate_size"] == 352
    assert cfg_json["quantization_config"] == qc_json == {
        "quant_method": "gptq", "bits": 4, "group_size": cfg.group_size, "sym": cfg.sym,
        "desc_act": cfg.desc_act, "checkpoint_format": cfg.checkpoint_format,
    }
    assert GPTQConfig.from_dict(qc_json) == cfg

    got_cfg, layers, others = read_gptq_checkpoint(out)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert "lm_head" in linears and len(linears) == 1 + 7 * 2
    assert set(layers) == set(linears) - {"lm_head"}
    state = model.state_dict()
    quantized_keys = {f"{n}.{p}" for n in layers for p in ("weight", "bias")}
    assert set(others) == set(state) - quantized_keys
    for key, t in others.items():
        assert t.dtype == state[key].dtype and torch.equal(t, state[key]), key
    for name, layer in layers.items():
        lin = linears[name]
        assert (layer.in_features, layer.out_features) == (lin.in_features, lin.out_features)
        w = lin.weight.detach().t()
        err = (w - dequantize_gptq(layer)).abs()
        assert (err <= rtn_bound(layer.scales, layer.g_idx)).all(), name
        assert err.max() > 0  # it really was quantized
        if lin.bias is not None:
            assert torch.equal(layer.bias, lin.bias.detach())
        else:
            assert layer.bias is None
    if cfg.desc_act:
        assert any(not torch.equal(l.g_idx, (torch.arange(l.in_features) // l.config.group_size).int()) for l in layers.values())
        assert layers["model.layers.0.self_attn.q_proj"].bias is not None
    # the down_proj has K=352: 3 groups of 128 with a last group of 96
    down = layers["model.layers.0.mlp.down_proj"]
    assert down.num_groups == cfg.num_groups(352)


def test_write_sharded_and_tied(tmp_path):
    cfg = GPTQConfig(group_size=64, sym=False, checkpoint_format="gptq_v2")
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    single = write_gptq_checkpoint(model, tmp_path / "one", cfg, progress=False)
    sharded = write_gptq_checkpoint(model, tmp_path / "many", cfg, max_shard_size="40KB", progress=False)
    files = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert set(index["weight_map"].values()) == set(files)
    _, l1, o1 = read_gptq_checkpoint(single)
    _, l2, o2 = read_gptq_checkpoint(sharded)
    assert "lm_head.weight" not in o1 and "model.embed_tokens.weight" in o1  # tied: written once
    assert set(l1) == set(l2) and set(o1) == set(o2)
    for n in l1:
        assert torch.equal(dequantize_gptq(l1[n]), dequantize_gptq(l2[n]))
    assert {l.name for l in iter_gptq_layers(sharded)} == set(l1)


def test_write_is_atomic(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[:, :32] = torch.rand(352, 32) + 0.1  # a group of positives only
    v1 = GPTQConfig(group_size=32, sym=False, checkpoint_format="gptq")
    with pytest.raises(GPTQFormatError, match="model.layers.1.mlp.up_proj.*true zero point of 0"):
        write_gptq_checkpoint(model, tmp_path / "ckpt", v1, progress=False)
    assert os.listdir(tmp_path) == []  # neither the target nor a temporary directory is left

    out = write_gptq_checkpoint(model, tmp_path / "ckpt", GPTQConfig(group_size=32, sym=False, checkpoint_format="gptq_v2"), progress=False)
    with pytest.raises(FileExistsError):
        write_gptq_checkpoint(model, out, GPTQConfig(), progress=False)
    assert load_gptq_config(out).checkpoint_format == "gptq_v2"
    write_gptq_checkpoint(model, out, GPTQConfig(), overwrite=True, progress=False)
    assert load_gptq_config(out) == GPTQConfig()
    assert os.listdir(tmp_path) == ["ckpt"]


def test_write_tokenizer_and_exclusions(tmp_path):
    class FakeTokenizer:
        def save_pretrained(self, d):
            with open(os.path.join(d, "tokenizer.json"), "w") as f:
                f.write("{}")

    model = tiny_model()
    out = write_gptq_checkpoint(
        model, tmp_path / "c", GPTQConfig(), tokenizer=FakeTokenizer(),
        modules_to_not_convert=("lm_head", "o_proj"), progress=False,
    )
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    _, layers, others = read_gptq_checkpoint(out)
    assert not any(n.endswith("o_proj") for n in layers) and len(layers) == 12
    assert "model.layers.0.self_attn.o_proj.weight" in others


@pytest.mark.parametrize("size, per_shard", [("1KB", 1), ("1KiB", 2), (1020, 2), (1019, 1)])
def test_shard_size_reads_as_save_pretrained(tmp_path, size, per_shard):
    # KB = 1000 bytes, KiB = 1024, as transformers' max_shard_size: two 510-byte tensors fit 1KiB, not 1KB
    writer = ShardWriter(str(tmp_path), size)
    for i in range(4):
        writer.add(f"t{i}", torch.zeros(510, dtype=torch.uint8))
    writer.finish()
    with open(tmp_path / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    assert len(set(weight_map.values())) == 4 // per_shard
