"""The transformers integration on a GPU: kernels in the model, against the CPU reference."""
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from hf_int4 import GPTQConfig, HfInt4Config, HfInt4Linear, extension_available
from hf_int4.fusion import HfInt4FusedLinear
from hf_int4.formats.gptq_writer import tiny_llama_config, write_gptq_checkpoint

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not extension_available(), reason="needs a CUDA GPU and the hf_int4 extension"
)

CONFIGS = {
    "g128-sym-v1": GPTQConfig(group_size=128, sym=True),
    "g32-asym-act-v2": GPTQConfig(group_size=32, sym=False, desc_act=True, checkpoint_format="gptq_v2"),
    "g64-dynamic-head": GPTQConfig(group_size=64, sym=True),
}
# GPTQModel's per-module settings: layer 0's o_proj float, layer 1's MLP at group 128 with zero points, the output
# head quantized
WRITER_ARGS = {
    "g64-dynamic-head": dict(modules_to_not_convert=(), dynamic={
        r"-:model\.layers\.0\.self_attn\.o_proj": {}, r"model\.layers\.1\.mlp\.": {"group_size": 128, "sym": False}}),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    # hidden 256 / intermediate 352: K = 352 is not a multiple of the kernel's tiles, N = 352 neither.
    model = LlamaForCausalLM(tiny_llama_config(hidden_size=256, intermediate_size=352))
    out = tmp_path_factory.mktemp("ckpt") / request.param
    write_gptq_checkpoint(model, out, CONFIGS[request.param], progress=False, **WRITER_ARGS.get(request.param, {}))
    return out


def _load(checkpoint, device, dtype, **config):
    return AutoModelForCausalLM.from_pretrained(
        checkpoint, quantization_config=HfInt4Config(**config), device_map=device, dtype=dtype
    ).eval()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_logits_match_cpu_reference(checkpoint, dtype):
    gpu = _load(checkpoint, "cuda", dtype)
    assert all(m.is_packed for m in gpu.modules() if isinstance(m, HfInt4Linear)), "kernels serve every layer"
    assert isinstance(gpu.lm_head, HfInt4Linear) == (checkpoint.name in WRITER_ARGS)
    cpu = _load(checkpoint, "cpu", torch.float32)
    ids = torch.randint(0, 256, (3, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = gpu(ids.cuda()).logits.float().cpu()
        want = cpu(ids).logits
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < (2e-2 if dtype == torch.bfloat16 else 5e-3), rel


def test_gradients_reach_the_input_through_every_layer(checkpoint):
    """Adapters trained on top (LoRA) need the gradient with respect to each quantized layer's input: on the GPU it
    must flow as on the CPU reference (the GEMM kernels have no backward; such inputs take dequantize-then-cuBLAS)."""
    gpu = _load(checkpoint, "cuda", torch.float16)
    cpu = _load(checkpoint, "cpu", torch.float32)
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(6))
    grads = []
    for model, device in ((gpu, "cuda"), (cpu, "cpu")):
        embeds = model.get_input_embeddings()(ids.to(device)).detach().float().requires_grad_()
        logits = model(inputs_embeds=embeds.to(model.dtype)).logits
        logits.float().logsumexp(-1).sum().backward()
        grads.append(embeds.grad.cpu())
    got, want = grads
    assert want.norm() > 0
    assert ((got - want).norm() / want.norm()).item() < 2e-2


def test_dequantize_on_the_gpu_gives_the_float_model(checkpoint):
    gpu = _load(checkpoint, "cuda", torch.float16)
    cpu = _load(checkpoint, "cpu", torch.float32)
    ids = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(8))
    dense = gpu.dequantize()
    assert not any(isinstance(m, HfInt4Linear) for m in dense.modules())
    with torch.no_grad():
        got = dense(ids.cuda()).logits.float().cpu()
        want = cpu(ids).logits
    assert ((got - want).norm() / want.norm()).item() < 5e-3


def test_model_converted_to_bfloat16_after_loading(checkpoint):
    gpu = _load(checkpoint, "cuda", torch.float16).to(torch.bfloat16)  # asymmetric zeros are re-expressed
    cpu = _load(checkpoint, "cpu", torch.float32)
    ids = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = gpu(ids.cuda()).logits.float().cpu()
        want = cpu(ids).logits
    assert ((got - want).norm() / want.norm()).item() < 2e-2


def test_sibling_projections_run_as_one_gemm(checkpoint):
    fused = _load(checkpoint, "cuda", torch.float16)
    apart = _load(checkpoint, "cuda", torch.float16, fuse_projections=False)
    groups = [m for m in fused.modules() if isinstance(m, HfInt4FusedLinear)]
    gated = [m for m in fused.modules() if hasattr(m, "_hf_int4_gated")]  # MLPs whose down projection takes gate/up
    if not CONFIGS[checkpoint.name].desc_act:  # the test writer gives act-order layers their own g_idx each
        assert len(groups) == 2 * fused.config.num_hidden_layers, "q/k/v and gate/up of every layer"
        assert len(gated) == fused.config.num_hidden_layers, "every layer's MLP"
    assert not any(isinstance(m, HfInt4FusedLinear) or hasattr(m, "_hf_int4_gated") for m in apart.modules())
    ids = torch.randint(0, 256, (2, 23), generator=torch.Generator().manual_seed(5)).cuda()
    with torch.no_grad():
        got, want = fused(ids).logits.float(), apart(ids).logits.float()
        step_got, step_want = fused(ids[:, :1]).logits.float(), apart(ids[:, :1]).logits.float()  # decode-sized
    for a, b in ((got, want), (step_got, step_want)):
        assert ((a - b).norm() / b.norm()).item() < 5e-3
    assert all(g._pending is None for g in groups), "no fused output is kept between calls"


def test_generate_static_cache_and_compile(checkpoint):
    # each checkpoint's model and shapes compile the same forward anew: without a reset, the third checkpoint's
    # compile passes dynamo's recompile limit (8), which fullgraph=True turns into an error
    torch._dynamo.reset()
    model = _load(checkpoint, "cuda", torch.float16)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(1)).cuda()
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    dynamic = model.generate(ids, **kwargs)
    static = model.generate(ids, cache_implementation="static", **kwargs)
    assert torch.equal(dynamic, static)
    compiled = torch.compile(model.forward, fullgraph=True)
    with torch.no_grad():
        eager = model(ids).logits
        graph = compiled(ids).logits
        # decode-sized (2 rows): the gated MLPs' down projections form silu(gate) * up in the streaming kernel
        eager_step, graph_step = model(ids[:, :1]).logits, compiled(ids[:, :1]).logits
    torch.testing.assert_close(graph, eager, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(graph_step, eager_step, rtol=2e-3, atol=2e-3)


def test_packed_checkpoint_roundtrip_on_gpu(checkpoint, tmp_path):
    model = _load(checkpoint, "cuda", torch.float16)
    model.save_pretrained(tmp_path / "packed")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "packed", device_map="cuda").eval()
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits), "same packed bytes, same kernel, same logits"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_device_map_auto_across_two_gpus(checkpoint):
    """accelerate splits the layers over two GPUs; each device's layers run the kernels with its own workspace."""
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, quantization_config=HfInt4Config(), device_map="auto", dtype=torch.float16,
        max_memory={0: "600KB", 1: "10GB"},
    ).eval()
    devices = {m.int4_qweight.device for m in model.modules() if isinstance(m, HfInt4Linear) and m._fused_into is None}
    assert devices == {torch.device("cuda", 0), torch.device("cuda", 1)}, devices
    cpu = _load(checkpoint, "cpu", torch.float32)
    ids = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model(ids.to("cuda:0")).logits.float().cpu()
        want = cpu(ids).logits
    assert ((got - want).norm() / want.norm()).item() < 5e-3


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_gpu_moe_matches_cpu_reference(kind, tmp_path):
    """Quantized MoE experts (hf_int4.experts) on the kernels, each expert's gate and up as one GEMM. Every token is
    routed to every expert (top-k = E), so fp16 rounding cannot change which experts a token meets."""
    import transformers

    torch.manual_seed(0)
    common = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                  tie_word_embeddings=False)
    if kind == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            intermediate_size=352, num_local_experts=4, num_experts_per_tok=4, **common))
    else:
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            intermediate_size=352, moe_intermediate_size=192, num_experts=4, num_experts_per_tok=4, **common))
    checkpoint = write_gptq_checkpoint(model, tmp_path / kind, GPTQConfig(group_size=64, sym=False), progress=False)
    gpu = _load(checkpoint, "cuda", torch.float16)
    fused = [m for m in gpu.modules() if isinstance(m, HfInt4FusedLinear)]
    assert len(fused) == 2 * (1 + 4), "q/k/v and every expert's gate/up, in both layers"
    assert sum(hasattr(m, "_hf_int4_gated") for m in gpu.modules()) == 2 * 4, "every expert's MLP is a gated one"
    cpu = _load(checkpoint, "cpu", torch.float32)
    for rows in (1, 37):
        ids = torch.randint(0, 256, (2, rows), generator=torch.Generator().manual_seed(rows))
        with torch.no_grad():
            got = gpu(ids.cuda()).logits.float().cpu()
            want = cpu(ids).logits
        assert ((got - want).norm() / want.norm()).item() < 5e-3
