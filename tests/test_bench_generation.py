"""The generation benchmark's `--attn sdpa_gqa` attention computes what transformers' eager attention does, in the
benchmark's own setting: a compiled (fullgraph) decode step on a static cache, grouped key/value heads, a batch."""
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
def logits_of_decode(model, attn: str, prompt, tokens) -> torch.Tensor:
    """Last-position logits of an eager prefill, then of each compiled decode step fed `tokens[:, i]`."""
    model.set_attn_implementation(attn)
    torch._dynamo.reset()

    def step(token, cache_position, cache):
        return model(token, cache_position=cache_position, past_key_values=cache, use_cache=True).logits[:, -1]

    compiled = torch.compile(step, fullgraph=True)
    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + tokens.shape[1] + 5)
    n = prompt.shape[1]
    out = [model(prompt, cache_position=torch.arange(n), past_key_values=cache, use_cache=True).logits[:, -1]]
    for i in range(tokens.shape[1]):
        out.append(compiled(tokens[:, i : i + 1], torch.tensor([n + i]), cache))
    return torch.stack(out)


def test_sdpa_gqa_matches_eager_attention(bench_generation):
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=500)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 500, (3, 7), generator=generator)
    tokens = torch.randint(0, 500, (3, 4), generator=generator)
    expected = logits_of_decode(model, "eager", prompt, tokens)
    got = logits_of_decode(model, "sdpa_gqa", prompt, tokens)
    assert got.shape == expected.shape == (5, 3, 500)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
