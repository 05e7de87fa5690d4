"""The decode step's parts that every model pays alike, per implementation: attention of one new token per sequence over
a static cache (transformers' compiled sdpa, which expands the key/value heads with repeat_kv under a mask, and
sdpa_gqa), and the greedy argmax over the vocabulary. Llama-3-8B shapes (32 query heads, 8 key/value heads of
128, vocabulary 128256), float16, each variant compiled (fullgraph) and timed by hf_int4.bench.time_rotating: CUDA-graph
replays of calls rotating over 32 layers' caches.

    python scripts/bench_decode_step_parts.py [--batches 1 16] [--caches 227 1024] [--json out.json]

The cache length default is what `examples/bench_generation.py --decode step` ends on with its defaults
(32 prompt tokens + 3 warm-up + 3 x 64 timed steps). Each attention is checked against a float32 reference.
"""
import argparse
import json
import os
import sys

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hf_int4.bench import time_rotating

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from bench_generation import greedy_token, sdpa_gqa_attention  # noqa: E402

LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 32, 32, 8, 128, 128256
SCALE = HEAD_DIM**-0.5


class AttentionLayer(torch.nn.Module):
    """What transformers' sdpa reads from the attention module."""
    num_key_value_groups = HEADS // KV_HEADS
    is_causal = True


def reference(q, k, v, keep):
    group = q.shape[1] // k.shape[1]
    k, v = (t.float().repeat_interleave(group, 1) for t in (k, v))
    scores = (q.float() @ k.transpose(-1, -2)) * SCALE
    return torch.softmax(scores.masked_fill(~keep, -float("inf")), -1) @ v


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 16])
    parser.add_argument("--caches", type=int, nargs="*", default=[227], help="static cache lengths")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    attentions = {"transformers_sdpa": sdpa_attention_forward, "sdpa_gqa": sdpa_gqa_attention}
    module = AttentionLayer()
    print(f"{'part':>28} {'batch':>5} {'cache':>5} {'us per call':>11} {'max |err|':>10}")
    for batch in args.batches:
        for cache in args.caches:
            filled = cache * 3 // 4  # positions past it are empty cache slots, masked
            keep = (torch.arange(cache, device="cuda") < filled).expand(batch, 1, 1, cache)
            queries = [torch.randn(batch, HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.half) for _ in range(LAYERS)]
            keys, values = ([torch.randn(batch, KV_HEADS, cache, HEAD_DIM, device="cuda", dtype=torch.half)
                             for _ in range(LAYERS)] for _ in range(2))
            expected = reference(queries[0], keys[0], values[0], keep)
            for name, attention in attentions.items():
                attend = torch.compile(attention, fullgraph=True, dynamic=False)
                layer = lambda i: attend(module, queries[i], keys[i], values[i], keep, scaling=SCALE)[0]  # noqa: E731
                err = (layer(0).transpose(1, 2).float() - expected).abs().max().item()  # back to [B, H, 1, D]
                us = time_rotating(layer, LAYERS)
                result["rows"].append({"part": f"attention {name}", "batch": batch, "cache": cache, "us": us,
                                       "max_abs_err": err})
                print(f"{'attention ' + name:>28} {batch:>5} {cache:>5} {us:>11.2f} {err:>10.2e}", flush=True)
        logits = torch.randn(batch, VOCAB, device="cuda", dtype=torch.half)
        for name, pick in {"argmax": lambda x: x.argmax(-1, keepdim=True), "greedy_token": greedy_token}.items():
            fn = torch.compile(pick, fullgraph=True, dynamic=False)
            assert torch.equal(fn(logits), logits.argmax(-1, keepdim=True))
            us = time_rotating(lambda i: fn(logits), 1, LAYERS)
            result["rows"].append({"part": name, "batch": batch, "us": us})
            print(f"{name:>28} {batch:>5} {'':>5} {us:>11.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
