"""What one decode step's attention costs per layer, by implementation (both models of the generation benchmark pay it
alike): Llama-3-8B heads (32 query, 8 key/value, dim 128), one query token per sequence over a static cache with a mask
of its filled slots, fp16, compiled by inductor and replayed as one CUDA graph over 32 layers' own caches.

    python scripts/attention_probe.py [--batches 1 16] [--cache 227] [--json out.json]

Each variant is checked against a float32 softmax(q k^T / sqrt(d)) v of the same tensors before it is timed.
"""
import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HEADS, KV_HEADS, DIM, LAYERS = 32, 8, 128, 32


def sdpa_gqa(q, k, v, mask):  # the benchmark's --attn sdpa_gqa: inductor picks the backend
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def sdpa_gqa_efficient(q, k, v, mask):
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def sdpa_repeat(q, k, v, mask):  # transformers' own sdpa with a static cache: repeat_kv, then a masked sdpa
    rep = HEADS // KV_HEADS
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)


def matmul_gqa(q, k, v, mask):
    """transformers' eager attention (scores, float32 softmax, weighted sum) with the query heads of a key/value head
    stacked as rows instead of repeat_kv copying the cache."""
    b, _, s, d = q.shape
    qg = q.view(b, KV_HEADS, HEADS // KV_HEADS * s, d)
    scores = (qg @ k.transpose(-1, -2)) * d**-0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.float().softmax(-1).to(q.dtype)
    return (weights @ v).view(b, HEADS, s, d)


def flash_unmasked(q, k, v, mask):  # a lower bound only: attends to every slot, filled or not
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


VARIANTS = [sdpa_gqa, sdpa_gqa_efficient, sdpa_repeat, matmul_gqa, flash_unmasked]


def reference(q, k, v, mask):
    rep = HEADS // KV_HEADS
    kf, vf = k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)
    scores = (q.float() @ kf.transpose(-1, -2)) * DIM**-0.5
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ vf


def graph_us(fn, layers, repeats=20, replays=10):
    """Median per-layer time of a CUDA graph of one call per layer."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for args in layers:
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args in layers:
            fn(*args)
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (replays * len(layers)))
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 4, 16, 64])
    parser.add_argument("--cache", type=int, default=227, help="static cache slots (the benchmark's: 32 + 3 + 3 x 64)")
    parser.add_argument("--filled", type=int, default=130, help="filled slots (the mask's True entries)")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cache {args.cache} slots, {args.filled} filled")
    print(f"{'batch':>5} " + " ".join(f"{f.__name__:>19}" for f in VARIANTS) + "   (us per layer; err = max |out - fp32|)")
    for batch in args.batches:
        mask = (torch.arange(args.cache, device="cuda") < args.filled).view(1, 1, 1, -1).expand(batch, 1, 1, -1)
        layers = [(torch.randn(batch, HEADS, 1, DIM, device="cuda", dtype=torch.float16),
                   torch.randn(batch, KV_HEADS, args.cache, DIM, device="cuda", dtype=torch.float16),
                   torch.randn(batch, KV_HEADS, args.cache, DIM, device="cuda", dtype=torch.float16),
                   mask) for _ in range(LAYERS)]
        ref = reference(*layers[0])
        row = {"batch": batch}
        for fn in VARIANTS:
            compiled = torch.compile(fn, fullgraph=True)
            try:
                out = compiled(*layers[0])
                err = (out.float() - ref).abs().max().item()
                row[fn.__name__] = {"us": graph_us(compiled, layers), "max_err": err}
            except Exception as exc:  # a backend that cannot run this case says why
                row[fn.__name__] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
        rows.append(row)
        cells = [f"{row[f.__name__]['us']:7.2f} err {row[f.__name__]['max_err']:.0e}" if "us" in row[f.__name__]
                 else f"{'n/a':>19}" for f in VARIANTS]
        print(f"{batch:>5} " + " ".join(f"{c:>19}" for c in cells), flush=True)
        for f in VARIANTS:
            if "error" in row[f.__name__]:
                print(f"      {f.__name__}: {row[f.__name__]['error']}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"device": torch.cuda.get_device_name(), "cache": args.cache, "filled": args.filled, "rows": rows},
                      out, indent=1)


if __name__ == "__main__":
    main()
