"""Decode attention of Llama-3-8B's shapes (32 query heads, 8 key/value heads, dim 128) over a static cache, per
layer: what transformers' compiled sdpa path runs (the key/value heads expanded to the query heads by repeat_kv, then
a masked SDPA) against SDPA reading the 8 key/value heads as they are (enable_gqa), eager and compiled, timed as
CUDA-graph replays. Run on a GPU machine: python3 scripts/attn_probe.py (docs/results/attn_probe_s42_h200.txt)."""
import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv


def us_per_call(fn, calls=200):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compile, warm up
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls // 10):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


for batch in (1, 16):
    for cache in (227, 1024):  # 227: bench_generation.py's decode steps
        q = torch.randn(batch, 32, 1, 128, device="cuda", dtype=torch.half)
        k, v = (torch.randn(batch, 8, cache, 128, device="cuda", dtype=torch.half) for _ in range(2))
        mask = torch.zeros(batch, 1, 1, cache, device="cuda", dtype=torch.bool)
        mask[..., : cache // 2] = True  # the positions written so far
        expanded = lambda: F.scaled_dot_product_attention(q, repeat_kv(k, 4), repeat_kv(v, 4), attn_mask=mask)
        gqa = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        diff = (gqa() - expanded()).abs().max().item()
        print(f"batch {batch:>2} cache {cache:>4}: repeat_kv+sdpa eager {us_per_call(expanded):6.1f} us, compiled "
              f"{us_per_call(torch.compile(expanded)):6.1f}; enable_gqa eager {us_per_call(gqa):6.1f}, compiled "
              f"{us_per_call(torch.compile(gqa)):6.1f} us per layer; max diff {diff:.1e}", flush=True)
