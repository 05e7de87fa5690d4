"""Sibling projections fused into one GEMM (hf_int4.fusion), on the CPU reference path: against the oracle
built from each member's unpacked GPTQ tensors, the call patterns that must recompute, the one copy of the
weights, saving, and torch.compile."""
import operator

import pytest
import torch
from torch import nn

from hf_int4 import GPTQConfig, HfInt4Linear, dispatch
from hf_int4.formats.gptq_writer import make_gptq_layer, random_gptq_layer
from hf_int4.fusion import FUSED_PREFIX, HfInt4FusedLinear, fuse_gated_mlp, fuse_group
from hf_int4.modules import pack_for_module, packed_state_dict
from hf_int4.reference import dequantize_gptq

F16 = torch.float16
CONFIGS = {
    "g128-sym": GPTQConfig(group_size=128, sym=True),
    "g32-asym-act-v2": GPTQConfig(group_size=32, sym=False, desc_act=True, checkpoint_format="gptq_v2"),
}
K, WIDTHS = 256, (256, 72, 136)  # 72 and 136: members padded to 128 columns inside the fused weight


class Attention(nn.Module):
    """q, k and v read the same input, as in transformers' Llama attention."""

    def __init__(self, members):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = members

    def forward(self, x):
        return self.q_proj(x).sum(-1) + 2 * self.k_proj(x).sum(-1) + 3 * self.v_proj(x).sum(-1)


def _members(cfg, bias=(True, False, True), seed=0):
    """Three layers cut out of one random GPTQ layer (so act-order layers share their g_idx), and their oracles."""
    _, raw = random_gptq_layer(K, sum(WIDTHS), cfg, seed=seed, with_bias=True)
    members, oracles, start = [], [], 0
    for name, width, has_bias in zip(("q_proj", "k_proj", "v_proj"), WIDTHS, bias):
        cols = slice(start, start + width)
        layer = make_gptq_layer(f"attn.{name}", raw["intweight"][:, cols], raw["zeros"][:, cols], raw["scales"][:, cols],
                                raw["g_idx"], cfg, raw["bias"][cols] if has_bias else None)
        module = HfInt4Linear(K, width, has_bias, cfg, dtype=F16, name=layer.name, packed=True)
        module.load_state_dict(packed_state_dict(pack_for_module(layer, F16), layer.bias))
        members.append(module)
        oracles.append((dequantize_gptq(layer).double(), None if layer.bias is None else layer.bias.double()))
        start += width
    return members, oracles


def _oracle(oracle, x):
    weight, bias = oracle
    out = x.double() @ weight
    return out if bias is None else out + bias


def _close(got, want):
    torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("name", CONFIGS)
def test_fused_members_match_the_oracle_with_one_gemm(name, monkeypatch):
    members, oracles = _members(CONFIGS[name])
    attn = Attention(members)
    before = {n: m.packed_state_dict() for n, m in zip(("q", "k", "v"), members)}
    fused = fuse_group(attn, ("q_proj", "k_proj", "v_proj"))
    assert isinstance(fused, HfInt4FusedLinear) and getattr(attn, FUSED_PREFIX + "q_proj_k_proj_v_proj") is fused
    assert fused.out_features == 128 + 128 + 136 + 128 and fused.name == "attn.{q_proj,k_proj,v_proj}"

    gemms = []
    real = HfInt4Linear.forward
    monkeypatch.setattr(HfInt4Linear, "forward", lambda self, x: gemms.append(self) or real(self, x))
    x = torch.randn(3, 5, K, generator=torch.Generator().manual_seed(1)).to(F16)
    outs = [m(x) for m in members]
    assert [g for g in gemms if isinstance(g, HfInt4FusedLinear)] == [fused], "one GEMM serves the three members"
    for out, oracle, width in zip(outs, oracles, WIDTHS):
        assert out.shape == (3, 5, width)
        _close(out, _oracle(oracle, x))
    assert fused._pending is None, "the last member drops the fused output"

    # the members keep no weights of their own, and save exactly what they held before
    for n, m in zip(("q", "k", "v"), members):
        assert not [b for b in m._buffers if m._buffers[b] is not None], n
        after = m.packed_state_dict()
        assert after.keys() == before[n].keys()
        for key in after:
            assert torch.equal(after[key], before[n][key]), (n, key)
    assert "weights=fused" in members[1].extra_repr()
    fused._dispatch = (torch.device("cpu"), dispatch.Plan(((1, "decode"), (64, "dequant")), "test plan"))
    monkeypatch.setattr(HfInt4Linear, "reference_path_reason", lambda self: None)  # as on a GPU
    choice = dispatch.explain(members[1], 100)  # a member's path is its fused module's
    assert choice.path == "dequant" and "attn.{q_proj,k_proj,v_proj}" in choice.reason, choice


def test_a_member_called_with_another_input_recomputes():
    members, oracles = _members(CONFIGS["g128-sym"])
    attn = Attention(members)
    fused = fuse_group(attn, ("q_proj", "k_proj", "v_proj"))
    gen = torch.Generator().manual_seed(2)
    x, y = (torch.randn(4, K, generator=gen).to(F16) for _ in range(2))
    _close(attn.q_proj(x), _oracle(oracles[0], x))
    x.mul_(-2)  # changed in place after q_proj saw it: the pending output is stale
    _close(attn.k_proj(x), _oracle(oracles[1], x))
    _close(attn.v_proj(y), _oracle(oracles[2], y))  # another tensor: not the pending output
    _close(attn.q_proj(x), _oracle(oracles[0], x))
    _close(attn.q_proj(x), _oracle(oracles[0], x))  # twice in a row: still right
    assert fused._pending is not None and fused._pending[0] is x
    with torch.inference_mode():  # inference tensors have no version counter
        z = torch.randn(2, K, generator=gen).to(F16)
        for member, oracle in zip(members, oracles):
            _close(member(z), _oracle(oracle, z))
        _close(attn.q_proj(z), _oracle(oracles[0], z))
        z.mul_(2)  # a member asking again is a new call, changed input or not
        _close(attn.q_proj(z), _oracle(oracles[0], z))


def test_layers_that_cannot_share_a_weight_stay_apart():
    members, _ = _members(CONFIGS["g128-sym"])
    other, _ = _members(GPTQConfig(group_size=64, sym=True))
    attn = Attention([members[0], other[1], members[2]])
    assert fuse_group(attn, ("q_proj", "k_proj", "v_proj")) is None
    assert not any(isinstance(m, HfInt4FusedLinear) for m in attn.modules())
    assert all(m._fused_into is None and m.int4_qweight is not None for m in (members[0], other[1], members[2]))
    act_a, _ = _members(CONFIGS["g32-asym-act-v2"], seed=3)
    act_b, _ = _members(CONFIGS["g32-asym-act-v2"], seed=4)  # another g_idx, another permutation
    assert fuse_group(Attention([act_a[0], act_b[1], act_a[2]]), ("q_proj", "k_proj", "v_proj")) is None


def test_compiled_forward_runs_one_gemm_per_group():
    members, oracles = _members(CONFIGS["g128-sym"])
    attn = Attention(members)
    fuse_group(attn, ("q_proj", "k_proj", "v_proj"))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    compiled = torch.compile(attn, fullgraph=True, backend=backend)
    x = torch.randn(2, K, generator=torch.Generator().manual_seed(5)).to(F16)
    with torch.no_grad():
        got = compiled(x)
    want = sum(c * _oracle(o, x).sum(-1) for c, o in zip((1, 2, 3), oracles))
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)
    (graph,) = graphs
    matmuls = [n for n in graph.graph.nodes if n.target in (operator.matmul, torch.matmul)]
    assert len(matmuls) == 1, graph.code
    assert attn.int4_fused_q_proj_k_proj_v_proj._pending is None


H, I = 256, 328  # hidden and intermediate sizes of the gated MLP tests: the gate is padded to 384 columns when fused


def _gated_mlp(hidden_act="silu", cls=None, seed=0):
    """transformers' LlamaMLP (or `cls`, a subclass) with HfInt4Linear projections, and the oracle of each."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = CONFIGS["g128-sym"]
    mlp = (cls or LlamaMLP)(LlamaConfig(hidden_size=H, intermediate_size=I, hidden_act=hidden_act))
    oracles = {}
    for i, (name, k, n) in enumerate((("gate_proj", H, I), ("up_proj", H, I), ("down_proj", I, H))):
        layer, _ = random_gptq_layer(k, n, cfg, seed=seed + i)
        module = HfInt4Linear(k, n, False, cfg, dtype=F16, name=f"mlp.{name}", packed=True)
        module.load_state_dict(packed_state_dict(pack_for_module(layer, F16), None))
        setattr(mlp, name, module)
        oracles[name] = (dequantize_gptq(layer).double(), None)
    return mlp, oracles


def _mlp_oracle(oracles, x):
    """down(silu(gate(x)) * up(x)) in float64, each projection's output rounded to float16 as the model's are."""
    gate, up = (_oracle(oracles[n], x).to(F16).double() for n in ("gate_proj", "up_proj"))
    return _oracle(oracles["down_proj"], (gate * torch.sigmoid(gate) * up).to(F16))


def test_a_gated_mlp_runs_its_down_projection_on_the_fused_output():
    mlp, oracles = _gated_mlp()
    x = torch.randn(3, 4, H, generator=torch.Generator().manual_seed(1)).to(F16)
    want = _mlp_oracle(oracles, x)
    fuse_group(mlp, ("gate_proj", "up_proj"))
    assert fuse_gated_mlp(mlp, ("gate_proj", "up_proj"))
    fused = mlp.int4_fused_gate_proj_up_proj
    assert mlp._hf_int4_gated == (fused, mlp.down_proj, 384) and "forward" in vars(mlp)
    calls = []
    real = HfInt4Linear.forward_gated
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HfInt4Linear, "forward_gated", lambda self, h, off: calls.append((self, h.shape, off)) or real(self, h, off))
        got = mlp(x)
    assert calls == [(mlp.down_proj, (3, 4, 384 + I), 384)], "the down projection takes the fused output as it is"
    assert fused._pending is None, "gate_proj / up_proj are not called as members"
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2)
    assert not fuse_gated_mlp(mlp, ("gate_proj", "up_proj")), "a replaced forward is not replaced again"


def test_mlps_of_another_activation_or_forward_keep_their_own():
    from transformers.models.llama.modeling_llama import LlamaMLP

    class Reversed(LlamaMLP):  # silu(up) * gate: the same modules, another function
        def forward(self, x):
            return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))

    x = torch.randn(5, H, generator=torch.Generator().manual_seed(2)).to(F16)
    for hidden_act, cls in (("gelu", None), ("silu", Reversed)):
        mlp, oracles = _gated_mlp(hidden_act, cls)
        want = mlp(x)
        fuse_group(mlp, ("gate_proj", "up_proj"))
        assert not fuse_gated_mlp(mlp, ("gate_proj", "up_proj")), hidden_act
        assert "forward" not in vars(mlp) and not hasattr(mlp, "_hf_int4_gated")
        torch.testing.assert_close(mlp(x), want, rtol=1e-2, atol=1e-2)


@pytest.fixture(scope="module")
def packed_llama(tmp_path_factory):
    """A tiny Llama GPTQ checkpoint saved in the packed layout: loaded on the CPU, its layers are packed."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from hf_int4 import HfInt4Config
    from hf_int4.formats.gptq_writer import tiny_llama_config, write_gptq_checkpoint

    tmp = tmp_path_factory.mktemp("fusion")
    torch.manual_seed(0)
    write_gptq_checkpoint(LlamaForCausalLM(tiny_llama_config()), tmp / "gptq", CONFIGS["g128-sym"], progress=False)
    AutoModelForCausalLM.from_pretrained(tmp / "gptq", quantization_config=HfInt4Config(), dtype=F16).save_pretrained(
        tmp / "packed")
    return tmp / "packed"


def _load_and_fuse(packed_llama):
    from transformers import AutoModelForCausalLM

    from hf_int4.fusion import SIBLING_GROUPS

    model = AutoModelForCausalLM.from_pretrained(packed_llama, dtype=F16).eval()
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        apart = model(ids).logits
    groups = [(parent, names, fuse_group(parent, names)) for parent in list(model.modules()) for names in SIBLING_GROUPS
              if all(isinstance(getattr(parent, n, None), HfInt4Linear) for n in names)]
    assert len(groups) == 2 * model.config.num_hidden_layers and all(g for _, _, g in groups)
    gated = [fuse_gated_mlp(parent, names) for parent, names, _ in groups if names == ("gate_proj", "up_proj")]
    assert len(gated) == model.config.num_hidden_layers and all(gated)
    return model, ids, apart


def test_a_fused_model_saves_the_checkpoint_it_loaded(packed_llama, tmp_path):
    """save_pretrained of a model whose projections are fused writes each layer's own packed tensors, byte for
    byte what the packed checkpoint held, and nothing of the fused modules."""
    from safetensors.torch import load_file

    model, ids, apart = _load_and_fuse(packed_llama)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, apart, rtol=1e-2, atol=1e-2)
    model.save_pretrained(tmp_path / "again")
    want, got = load_file(packed_llama / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert got.keys() == want.keys() and not any(FUSED_PREFIX in k for k in got)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_a_fused_model_dequantizes_to_the_float_model_it_stands_for(packed_llama, tmp_path):
    """model.dequantize() on fused projections and gated MLPs: plain nn.Linear layers holding (q - z) * s, the MLPs on
    their own forward, no fused module left; the float model computes what the quantized one did."""
    from transformers import AutoModelForCausalLM

    model, ids, apart = _load_and_fuse(packed_llama)
    dense = model.dequantize()
    assert not [n for n, m in dense.named_modules() if isinstance(m, HfInt4Linear) or FUSED_PREFIX in n]
    assert not any(hasattr(m, "_hf_int4_gated") for m in dense.modules())
    assert not hasattr(dense.config, "quantization_config")
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, apart, rtol=1e-2, atol=1e-2)
    dense.save_pretrained(tmp_path / "float")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "float", dtype=F16).eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, dense(ids).logits)


def _traced_matmuls(model, ids):
    """Compile model.forward (fullgraph) with a recording backend; the logits of two compiled calls and the one
    traced graph's number of matmul nodes."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    compiled = torch.compile(model.forward, fullgraph=True, backend=backend)
    with torch.no_grad():
        logits = [compiled(ids).logits, compiled(ids).logits]
    (graph,) = graphs  # one trace, no recompilation on the second call
    return logits, sum(n.target in (operator.matmul, torch.matmul) for n in graph.graph.nodes)


def test_a_fused_llama_compiles_to_one_graph_with_one_gemm_per_group(packed_llama):
    from transformers import AutoModelForCausalLM

    apart_model = AutoModelForCausalLM.from_pretrained(packed_llama, dtype=F16).eval()
    model, ids, apart = _load_and_fuse(packed_llama)
    _, unfused = _traced_matmuls(apart_model, ids)
    logits, fused = _traced_matmuls(model, ids)
    with torch.no_grad():
        eager = model(ids).logits
    assert all(torch.equal(l, eager) for l in logits)
    # Counted against the same model unfused: transformers versions differ in matmuls outside the projections
    # (e.g. the rotary embedding's).
    assert unfused - fused == 3 * model.config.num_hidden_layers, "q/k/v and gate/up: 7 GEMMs per layer become 4"


def test_the_callers_fuse_choice_holds_for_packed_checkpoints(packed_llama):
    """fuse_projections is the caller's, also for a packed checkpoint whose config.json carries one."""
    from transformers import AutoModelForCausalLM

    from hf_int4 import HfInt4Config

    for fuse in (False, True):
        model = AutoModelForCausalLM.from_pretrained(packed_llama, quantization_config=HfInt4Config(fuse_projections=fuse),
                                                     dtype=F16)
        qc = model.config.quantization_config
        assert qc.fuse_projections is fuse and qc.weight_format == "packed"


@pytest.mark.parametrize("width,size_k,up_offset", [(17, 8, 16), (24, 16, 8), (32, 0, 16)])
def test_silu_mul_refuses_slices_that_do_not_fit_on_every_device(width, size_k, up_offset):
    """The CPU path checks what the CUDA op checks: no broadcast of a short up slice, no overlapping gate and up."""
    from hf_int4.ops import silu_mul

    with pytest.raises(ValueError, match="does not hold"):
        silu_mul(torch.randn(2, width), size_k, up_offset)
    h = torch.randn(2, 40)
    torch.testing.assert_close(silu_mul(h, 16, 20), torch.nn.functional.silu(h[:, :16]) * h[:, 20:36])
