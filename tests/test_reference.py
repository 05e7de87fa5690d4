"""The exact reference: dequantization by hand and matmul against float64."""
import pytest
import torch

from gptq_oracle import weight_from_ints
from hf_int4.formats import GPTQConfig, GPTQFormatError, GPTQLayer
from hf_int4.formats.gptq_writer import random_gptq_layer
from hf_int4.reference import dequantize_gptq, gptq_matmul_reference


def test_dequantize_tiny_by_hand():
    # K=16, N=8, one group of 16: q[k, n] = k, zero (v2) of column n = n, scale of column n = 2^-n.
    cfg = GPTQConfig(group_size=16, sym=False, checkpoint_format="gptq_v2")
    qweight = torch.zeros(2, 8, dtype=torch.int32)
    for r in range(2):
        word = sum((8 * r + j) << (4 * j) for j in range(8))
        qweight[r] = word - (1 << 32) if word >= 1 << 31 else word
    qzeros = torch.tensor([[0x76543210]], dtype=torch.int32)
    scales = torch.tensor([[2.0 ** -n for n in range(8)]]).half()
    layer = GPTQLayer.from_tensors("hand", {"qweight": qweight, "qzeros": qzeros, "scales": scales}, cfg)
    w = dequantize_gptq(layer)
    for k in range(16):
        for n in range(8):
            assert w[k, n].item() == (k - n) * 2.0 ** -n


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("sym,desc_act,gs", [(True, False, 128), (False, True, 64), (False, False, -1)])
def test_dequantize_matches_raw_ints(fmt, sym, desc_act, gs):
    cfg = GPTQConfig(group_size=gs, sym=sym, desc_act=desc_act, checkpoint_format=fmt)
    layer, raw = random_gptq_layer(576, 192, cfg, seed=7)
    assert torch.equal(dequantize_gptq(layer), weight_from_ints(raw, torch.float32))  # bit for bit


# half an ulp of the output dtype, relative: the one rounding after the fp32 result
OUT_ROUNDING = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 0.0}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1,), (5,), (2, 3)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_against_float64(dtype, shape, with_bias):
    cfg = GPTQConfig(group_size=128, sym=False, desc_act=True, checkpoint_format="gptq_v2")
    layer, raw = random_gptq_layer(576, 192, cfg, seed=3, with_bias=with_bias)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(*shape, 576, generator=gen).to(dtype)
    y = gptq_matmul_reference(x, layer)
    assert y.dtype == dtype and y.shape == (*shape, 192)
    w = weight_from_ints(raw)
    want = x.double() @ w
    if with_bias:
        want = want + raw["bias"].double()
    assert want.abs().mean() > 0.1  # outputs are O(1), so the tolerance means something
    # fp32 accumulation error is bounded relative to sum |x| |w| (K * eps32 worst case; 1e-5 ~ 170 eps32)
    accumulation = 1e-5 * (x.double().abs() @ w.abs())
    err = (y.double() - want).abs()
    assert (err <= OUT_ROUNDING[dtype] * want.abs() * 1.01 + accumulation).all(), err.max()


def test_matmul_float64_is_computed_in_float64():
    cfg = GPTQConfig(group_size=32, sym=True, checkpoint_format="gptq")
    layer, raw = random_gptq_layer(576, 64, cfg, seed=5, with_bias=True)
    x = torch.randn(4, 576, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = gptq_matmul_reference(x, layer)
    want = x @ weight_from_ints(raw) + raw["bias"].double()
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


def test_precomputed_weight_and_errors():
    cfg = GPTQConfig(group_size=64, sym=False, checkpoint_format="gptq")
    layer, _ = random_gptq_layer(128, 32, cfg, seed=2, with_bias=True, name="model.layers.1.self_attn.o_proj")
    x = torch.randn(3, 128).half()
    w = dequantize_gptq(layer)
    assert torch.equal(gptq_matmul_reference(x, layer, weight=w), gptq_matmul_reference(x, layer))
    with pytest.raises(GPTQFormatError, match="model.layers.1.self_attn.o_proj.*in_features=128"):
        gptq_matmul_reference(torch.randn(3, 64), layer)
    with pytest.raises(GPTQFormatError, match="model.layers.1.self_attn.o_proj.*precomputed weight"):
        gptq_matmul_reference(x, layer, weight=w.t())


def test_zero_rows_input():
    layer, _ = random_gptq_layer(64, 16, GPTQConfig(group_size=32), seed=0)
    y = gptq_matmul_reference(torch.empty(0, 64, dtype=torch.bfloat16), layer)
    assert y.shape == (0, 16) and y.dtype == torch.bfloat16
