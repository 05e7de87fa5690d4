"""The generation benchmark's attention (`--attn sdpa_gqa`) computes what transformers' eager
attention does, in the benchmark's own setting: a compiled (fullgraph) decode step on a static cache, grouped key/value
heads, a batch; its two-stage greedy argmax picks what `argmax` picks."""
import importlib.util
import pathlib
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "bench_generation.py"


@pytest.fixture(scope="module")
def bench_generation():
    spec = importlib.util.spec_from_file_location("bench_generation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_generation"] = module  # dynamo looks the attention function's module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["bench_generation"]


@torch.no_grad()
def logits_of_decode(model, attn: str, prompt, tokens, compiled: bool = True) -> torch.Tensor:
    """Last-position logits of an eager prefill, then of each decode step (compiled or not) fed `tokens[:, i]`."""
    model.set_attn_implementation(attn)
    torch._dynamo.reset()

    def step(token, cache_position, cache):
        return model(token, cache_position=cache_position, past_key_values=cache, use_cache=True).logits[:, -1]

    step = torch.compile(step, fullgraph=True) if compiled else step
    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + tokens.shape[1] + 5)
    n = prompt.shape[1]
    positions = torch.arange(n, device=prompt.device)
    out = [model(prompt, cache_position=positions, past_key_values=cache, use_cache=True).logits[:, -1]]
    for i in range(tokens.shape[1]):
        out.append(step(tokens[:, i : i + 1], positions[-1:] + 1 + i, cache))
    return torch.stack(out)


def test_sdpa_gqa_matches_eager_attention(bench_generation):
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=500)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 500, (3, 7), generator=generator)
    tokens = torch.randint(0, 500, (3, 4), generator=generator)
    expected = logits_of_decode(model, "eager", prompt, tokens, compiled=False)
    got = logits_of_decode(model, "sdpa_gqa", prompt, tokens)
    assert got.shape == expected.shape == (5, 3, 500)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("vocab", [500, 512, 128256])
def test_greedy_token_is_argmax(bench_generation, vocab):
    generator = torch.Generator().manual_seed(vocab)
    spread = torch.randn(4, vocab, generator=generator).half()
    spread[0, [vocab // 3, vocab - 1]] = 100  # a tie across chunks: the first wins
    ties = torch.randint(-2, 2, (4, vocab), generator=generator).half()  # many ties inside chunks
    for logits in (spread, ties):
        expected = logits.argmax(-1, keepdim=True)
        assert torch.equal(bench_generation.greedy_token(logits), expected)
        assert torch.equal(torch.compile(bench_generation.greedy_token, fullgraph=True)(logits), expected)
