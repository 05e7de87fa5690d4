"""GPTQ checkpoints of MoE models (one quantized linear per expert) in models that transformers 5 holds with fused
experts: Mixtral (w1/w3/w2 under block_sparse_moe, renamed to mlp on load), Qwen2-MoE (gate/up/down_proj, a shared
expert), Qwen3-MoE. The oracle is the float model transformers loads from the dequantized GPTQ tensors, merging the
experts into its fused parameters by its own conversion mapping."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from hf_int4 import GPTQConfig, GPTQFormatError, HfInt4Config, HfInt4Linear
from hf_int4.cli import main as cli
from hf_int4.experts import SequentialExperts, split_quantized_experts, unsupported_layout
from hf_int4.formats.gptq_writer import write_gptq_checkpoint
from model_oracle import dequantized_float_checkpoint

COMMON = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=160,
              tie_word_embeddings=False)


def _model(kind, seed=0):
    import transformers

    torch.manual_seed(seed)
    if kind == "mixtral":
        config = transformers.MixtralConfig(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, **COMMON)
        return transformers.MixtralForCausalLM(config)
    if kind == "qwen2_moe":  # layer 1 dense (mlp_only_layers), a shared expert beside the routed ones
        config = transformers.Qwen2MoeConfig(intermediate_size=160, moe_intermediate_size=80, shared_expert_intermediate_size=64,
                                             num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1], **COMMON)
        return transformers.Qwen2MoeForCausalLM(config)
    config = transformers.Qwen3MoeConfig(intermediate_size=160, moe_intermediate_size=64, num_experts=6,
                                         num_experts_per_tok=3, norm_topk_prob=True, **COMMON)
    return transformers.Qwen3MoeForCausalLM(config)


EXPERT_NAMES = {"mixtral": "model.layers.0.block_sparse_moe.experts.3.w3",
                "qwen2_moe": "model.layers.0.mlp.experts.3.up_proj", "qwen3_moe": "model.layers.1.mlp.experts.5.down_proj"}
VARIANTS = {
    "g32-asym-act-v2": GPTQConfig(group_size=32, sym=False, desc_act=True, checkpoint_format="gptq_v2"),
    "g64-sym-v1": GPTQConfig(group_size=64, sym=True, desc_act=False, checkpoint_format="gptq"),
}


def _write(tmp_path, kind, config, **kwargs):
    # GPTQ tools leave Qwen2-MoE's shared_expert_gate (one output) in float, as they do the routers.
    return write_gptq_checkpoint(_model(kind), str(tmp_path / f"{kind}-gptq"), config, progress=False,
                                 modules_to_not_convert=("lm_head", "shared_expert_gate"), **kwargs)


def _load(checkpoint, **config):
    return AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=HfInt4Config(**config),
                                                dtype=torch.float32).eval()


def _oracle(tmp_path, checkpoint):
    return AutoModelForCausalLM.from_pretrained(dequantized_float_checkpoint(checkpoint, str(tmp_path / "float")),
                                                dtype=torch.float32).eval()


def _logits(model, seed=1):
    ids = torch.randint(0, 160, (3, 11), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def _close(got, want):
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 1e-5, rel


def _keys(checkpoint):
    keys = set()
    for name in os.listdir(checkpoint):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(checkpoint, name), "pt") as f:
                keys |= set(f.keys())
    return keys


@pytest.mark.parametrize("kind", list(EXPERT_NAMES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_moe_checkpoint_matches_dequantized_float_model_cpu(tmp_path, kind, variant):
    checkpoint = _write(tmp_path, kind, VARIANTS[variant])
    keys = _keys(checkpoint)
    assert f"{EXPERT_NAMES[kind]}.qweight" in keys, "the checkpoint names its experts as the original checkpoints do"
    assert not any("gate_up_proj" in k for k in keys)
    model = _load(checkpoint)
    experts = [m for m in model.modules() if isinstance(m, SequentialExperts)]
    assert len(experts) == (1 if kind == "qwen2_moe" else 2)
    for block in experts:  # every expert's three linears quantized, none left float
        assert sum(isinstance(m, HfInt4Linear) for m in block.modules()) == 3 * block.num_experts
        assert not any(isinstance(m, torch.nn.Linear) for m in block.modules())
    _close(_logits(model), _logits(_oracle(tmp_path, checkpoint)))


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_moe_dequantize_saves_a_float_checkpoint_that_transformers_loads_cpu(tmp_path, kind):
    """model.dequantize() leaves one float linear per expert, named as the original checkpoints name them, so the
    float checkpoint it saves loads into transformers' fused experts by its own conversion mapping."""
    checkpoint = _write(tmp_path, kind, VARIANTS["g64-sym-v1"])
    model = _load(checkpoint).dequantize()
    assert not any(isinstance(m, HfInt4Linear) for m in model.modules())
    want = _logits(_oracle(tmp_path, checkpoint))
    _close(_logits(model), want)
    model.save_pretrained(tmp_path / "dense")
    _close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32).eval()), want)


def test_moe_packed_checkpoints_reload_cpu(tmp_path):
    """save_pretrained and hf-int4 repack write the experts packed under the checkpoint's names; both reload and
    compute what the GPTQ-form model computes (each layer in fp32 from the same fp16 scales: identical logits)."""
    checkpoint = _write(tmp_path, "mixtral", VARIANTS["g32-asym-act-v2"])
    model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=HfInt4Config(), dtype=torch.float16)
    saved, repacked = str(tmp_path / "saved"), str(tmp_path / "repacked")
    model.save_pretrained(saved)
    assert cli(["repack", checkpoint, repacked]) == 0
    for packed in (saved, repacked):
        keys = _keys(packed)
        assert "model.layers.1.block_sparse_moe.experts.2.w2.int4_qweight" in keys, packed
        assert not any(k.endswith(".qweight") or "gate_up_proj" in k for k in keys), packed
        reloaded = AutoModelForCausalLM.from_pretrained(packed, dtype=torch.float16)
        assert isinstance(reloaded.model.layers[1].mlp.experts, SequentialExperts)
        assert torch.equal(_logits(reloaded), _logits(model)), packed


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_moe_dynamic_rules_keep_one_block_of_experts_float_cpu(tmp_path, kind):
    """A "-:" rule on layer 1's experts: the checkpoint holds them as float per-expert weights, which transformers
    merges into its fused experts; layer 0's experts load quantized, each expert with the rules' settings. The rules
    name modules as the checkpoint does (Mixtral's block_sparse_moe, which the model calls mlp)."""
    block = "block_sparse_moe" if kind == "mixtral" else "mlp"
    gate = "w1" if kind == "mixtral" else "gate_proj"
    dynamic = {rf"-:model\.layers\.1\.{block}\.experts\.": {},
               rf"model\.layers\.0\.{block}\.experts\.[02]\.": {"group_size": 32}}
    checkpoint = _write(tmp_path, kind, VARIANTS["g64-sym-v1"], dynamic=dynamic)
    keys = _keys(checkpoint)
    assert f"model.layers.1.{block}.experts.0.{gate}.weight" in keys
    assert f"model.layers.0.{block}.experts.0.{gate}.qweight" in keys
    model = _load(checkpoint)
    assert not isinstance(model.model.layers[1].mlp.experts, SequentialExperts)
    experts = model.model.layers[0].mlp.experts
    group_sizes = [32, 64, 32] + [64] * (experts.num_experts - 3)
    assert [getattr(experts[e], gate).config.group_size for e in range(experts.num_experts)] == group_sizes
    _close(_logits(model), _logits(_oracle(tmp_path, checkpoint)))

    half = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=HfInt4Config(), dtype=torch.float16)
    half.save_pretrained(tmp_path / "saved")  # the rules travel with the packed checkpoint, in the checkpoint's names
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float16)
    experts = reloaded.model.layers[0].mlp.experts
    assert [getattr(experts[e], gate).config.group_size for e in range(experts.num_experts)] == group_sizes
    assert not isinstance(reloaded.model.layers[1].mlp.experts, SequentialExperts)
    assert torch.equal(_logits(reloaded), _logits(half))


def test_moe_experts_under_unknown_names_are_refused(tmp_path):
    checkpoint = _write(tmp_path, "mixtral", VARIANTS["g64-sym-v1"])
    path = os.path.join(checkpoint, "model.safetensors")
    with safe_open(path, "pt") as f:
        tensors = {k.replace(".w1.", ".fc1."): f.get_tensor(k) for k in f.keys()}
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(GPTQFormatError, match=r"layer model\.layers\.0\.mlp\.experts\.0\.fc1: the checkpoint holds "
                                              r"quantized MoE experts, but this model \(MixtralForCausalLM\) cannot "
                                              r"hold them: .*\['fc1', 'w2', 'w3'\]"):
        _load(checkpoint)


def test_moe_experts_of_other_layouts_are_refused():
    """gpt-oss's experts have biases, interleaved gate/up and their own gate: not split, refused by name."""
    import transformers

    config = transformers.GptOssConfig(num_local_experts=2, **{**COMMON, "num_hidden_layers": 1})
    with torch.device("meta"):
        model = transformers.GptOssForCausalLM(config)
    why = unsupported_layout(model.model.layers[0].mlp.experts)
    assert "gate_up_proj_bias" in why
    with pytest.raises(GPTQFormatError, match=r"layer model\.layers\.0\.mlp\.experts\.0\.gate_proj: .*GptOssForCausalLM"
                                              r".*gate_up_proj_bias"):
        split_quantized_experts(model, {"model.layers.0.mlp.experts.0.gate_proj"}, {})


def test_moe_split_float_model_computes_what_the_fused_one_does():
    from hf_int4.experts import split_float_experts

    model = _model("qwen2_moe").eval()
    want = _logits(model)
    assert split_float_experts(model) == ["model.layers.0.mlp.experts"]
    _close(_logits(model), want)
    config = json.loads(model.config.to_json_string())
    assert config["model_type"] == "qwen2_moe"


def test_moe_experts_the_model_does_not_have_are_refused(tmp_path):
    """A checkpoint with more experts than the model's config: transformers would drop the extra ones as unexpected;
    they are refused, naming the first."""
    checkpoint = _write(tmp_path, "mixtral", VARIANTS["g64-sym-v1"])
    path = os.path.join(checkpoint, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["num_local_experts"] = 3
    with open(path, "w") as f:
        json.dump(config, f)
    with pytest.raises(GPTQFormatError, match=r"layer model\.layers\.0\.mlp\.experts\.3\.w1: the checkpoint holds "
                                              r"quantized MoE experts, but no linear layer of this model "
                                              r"\(MixtralForCausalLM\) has that name"):
        _load(checkpoint)


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_moe_dynamic_rules_keep_single_experts_float_cpu(tmp_path, kind):
    """A "-:" rule on one expert of a quantized block: that expert's float weights load into its own linears where
    the checkpoint names them as the model does (Qwen3-MoE); where transformers renames the block on load (Mixtral's
    block_sparse_moe -> mlp), its conversion mapping would merge them into fused experts the split block no longer
    has, so the load is refused naming the expert instead of leaving it at random weights."""
    block = "block_sparse_moe" if kind == "mixtral" else "mlp"
    gate = "w1" if kind == "mixtral" else "gate_proj"
    checkpoint = _write(tmp_path, kind, VARIANTS["g64-sym-v1"], dynamic={rf"-:model\.layers\.0\.{block}\.experts\.1\.": {}})
    if kind == "mixtral":
        with pytest.raises(GPTQFormatError, match=r"layer model\.layers\.0\.mlp\.experts\.1\.w1: .*float"):
            _load(checkpoint)
        return
    with safe_open(os.path.join(checkpoint, "model.safetensors"), "pt") as f:
        stored = f.get_tensor(f"model.layers.0.{block}.experts.1.{gate}.weight")
    model = _load(checkpoint)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, SequentialExperts) and isinstance(getattr(experts[0], gate), HfInt4Linear)
    assert type(getattr(experts[1], gate)) is torch.nn.Linear
    assert torch.equal(getattr(experts[1], gate).weight, stored.float())
    _close(_logits(model), _logits(_oracle(tmp_path, checkpoint)))
