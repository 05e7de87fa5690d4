"""Kernel benchmark: hf_int4 (dispatched, and each path forced) vs cuBLAS (F.linear, in the run's dtype: fp16, or
bf16 with --dtype bfloat16; its columns and keys are named fp16 either way) and torch's built-in int4, side by side.

    python -m hf_int4.bench [--shapes 4096x4096,...] [--ms 1,2,4,...] [--asym] [--json out.json]

`path` is the path the dispatch plan chose; decode_x / dequant_x are the forced paths. read_x is fp16's time over
that of a kernel that only reads the packed weight and its scales (no arithmetic, no output), timed the same way:
about the most our kernels could reach at that M (it launches early behind the previous call and lets the next one
start once its loads are issued, as they do). Also prints the dequantize pass alone per
shape, as a percentage of the measured copy bandwidth. The dispatched column is the
chosen path's forced time: a CUDA graph of dispatched calls holds the same kernels, so timing it again would
only add a second sample of that path (on the H200 two such samples of one run differed by 5-15% at M >= 1024).

Method: every path is timed as a CUDA graph of many calls that rotate over enough weight copies
(> 4x the L2 size in total) that the weights stream from HBM, not L2; at each M the paths' graphs are
replayed in turn, in a fresh random order each round, several rounds, and the median per-call time is
reported. Ratios are fp16_us / path_us from the same run.
"""
import argparse
import functools
import json
import random
import statistics
import sys

import torch
import torch.nn.functional as F

from hf_int4 import dispatch
from hf_int4.formats import GPTQConfig, GPTQFormatError
from hf_int4.ops import READ_FLOOR_THREADS, read_floor

LLAMA3_8B_SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (8192, 8192)]
DEFAULT_MS = sorted([2**i for i in range(14)] + [3, 48, 96, 192, 384, 768, 1536])  # 1 .. 8192
TINYGEMM_MAX_M = 512


def copy_bandwidth() -> float:
    """Measured device-to-device copy bandwidth in bytes/s, counting bytes read + written."""
    src = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() / statistics.median(times)


def time_rotating(fn, copies: int, calls: int = 0, replays: int = 7) -> float:
    """Median microseconds per call of fn(i) over a CUDA graph of `calls` calls, i rotating over copies."""
    return time_interleaved({"": (fn, copies)}, calls, replays)[""]


def capture_rotating(fn, copies: int, calls: int = 0):
    """(graph, calls): a CUDA graph of `calls` (default max(2 copies, 20), rounded up to a multiple of copies) calls
    fn(i), i rotating over copies, replayed once. A whole number of rotations: a timed replay right after another
    one then re-reads each copy only after all the others, as within one replay (with 20 calls over 6 copies its
    first two calls would re-read copies last read 1 copy earlier, e.g. 48 MiB for fp16 4096 x 6144, under the L2)."""
    calls = calls or max(copies * 2, 20)
    calls = -(-calls // copies) * copies
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i % copies)
    graph.replay()
    return graph, calls


def time_interleaved(fns: dict, calls: int = 0, replays: int = 7) -> dict:
    """{name: median us per call} for {name: (fn, copies)}: each fn as a CUDA graph of many calls fn(i), i rotating
    over its copies; the graphs replay in turn (A B C A B C ...), so that every one meets the same clocks: at large
    M the GPU's clock follows its power draw, and paths timed one after the other differed by up to 15% run to run.
    Each timed replay follows an untimed one of the same graph, and each round takes the paths in a new random
    order: a path timed in two fixed slots of every round measured 5-15% apart at M >= 1024 (H200), so no path
    keeps one slot's neighbours."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn, copies in fns.values():
            for i in range(copies):  # warm-up: lazy init, autotuning, workspace
                fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graphs = {name: capture_rotating(fn, copies, calls) for name, (fn, copies) in fns.items()}
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = {name: [] for name in fns}
    order, shuffle = list(graphs), random.Random(0).shuffle
    for _ in range(replays):
        shuffle(order)
        for name in order:
            graph, n = graphs[name]
            graph.replay()
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) * 1e3 / n)
    del graphs
    return {name: statistics.median(t) for name, t in times.items()}


def copies_for(bytes_per_copy: int) -> int:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(2, -(-4 * l2 // bytes_per_copy) + 1)


class Shape:
    """One layer shape with its weight copies for every path; built once, timed at every M."""

    def __init__(self, K: int, N: int, group_size: int, dtype: torch.dtype, sym: bool = True):
        from hf_int4.formats.gptq_writer import random_gptq_layer
        from hf_int4.packing import PackedInt4Weight, pack_gptq_layer

        self.K, self.N, self.dtype = K, N, dtype
        layer, _ = random_gptq_layer(K, N, GPTQConfig(group_size=group_size, sym=sym), seed=0, device="cuda")
        packed = pack_gptq_layer(layer, dtype)
        self.int4_bytes = sum(t.numel() * t.element_size() for t in packed.tensors().values())
        self.packed = [packed] + [
            PackedInt4Weight.from_tensors(
                {k: v.clone() for k, v in packed.tensors().items()}, in_features=K, out_features=N, group_size=group_size
            )
            for _ in range(1, copies_for(self.int4_bytes))
        ]
        # the cuBLAS baseline ("fp16" in names and keys) runs in the activations' dtype: bf16 cuBLAS for bfloat16
        w = torch.randn(N, K, device="cuda", dtype=dtype) / K**0.5
        self.fp16 = [w] + [w.clone() for _ in range(1, copies_for(w.numel() * w.element_size()))]
        self.tinygemm = self._tinygemm(w, group_size)

    @functools.cached_property
    def plan(self) -> dispatch.Plan:
        """The path the dispatched column takes at each M (reads the table once per shape; only when asked: `tune`
        times the paths to replace a table that may not load)."""
        return dispatch.plan_for(dispatch.LinearSpec.of(self.packed[0]), self.packed[0].device)

    def _tinygemm(self, w, group_size):
        """torch's built-in int4 (bf16): weights from a random fp16 matrix; None where this torch lacks it."""
        try:
            gs = group_size if group_size > 0 else 256
            q = torch.randint(0, 16, (self.N, self.K), dtype=torch.int32, device="cuda")
            packed_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            wq = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
            sz = torch.rand(self.K // gs, self.N, 2, device="cuda", dtype=torch.bfloat16)
            x = torch.randn(1, self.K, device="cuda", dtype=torch.bfloat16)
            torch.ops.aten._weight_int4pack_mm(x, wq, gs, sz)
            # scales/zeros rotate with the weights, as ours do: one shared copy would stay in L2 for every call
            n = copies_for(wq.numel() * wq.element_size() + sz.numel() * sz.element_size())
            return gs, [wq] + [wq.clone() for _ in range(1, n)], [sz] + [sz.clone() for _ in range(1, n)]
        except (RuntimeError, AttributeError) as exc:
            print(f"torch int4 unavailable: {exc}", file=sys.stderr)
            return None

    def runnable_paths(self):
        """hf_int4's paths (hf_int4.dispatch.PATHS) that can run this layer on this GPU."""
        props = torch.cuda.get_device_properties(self.packed[0].device)
        spec = dispatch.LinearSpec.of(self.packed[0])
        return [name for name, path in dispatch.PATHS.items()
                if path.unsupported(spec) is None and path.device_unsupported(props) is None]

    def time_dequantize(self) -> float:
        """us per dequantize pass of the whole weight (the extra cost of the dequant path)."""
        from hf_int4.ops import dequantize

        return time_rotating(lambda i: dequantize(self.packed[i]), len(self.packed))

    def time_paths(self, M: int, paths) -> dict:
        """Median us per call of each named path at M rows, timed interleaved (time_interleaved): fp16 (F.linear),
        torch_int4, read (hf_int4.ops.read_floor: the packed weight's bytes read, nothing else), hf_int4's own paths
        (hf_int4.dispatch.PATHS, forced) and dispatched (the forced time of the path this layer's plan picks for M,
        which must be among `paths`)."""
        x = torch.randn(M, self.K, device="cuda", dtype=self.dtype)
        row = {"K": self.K, "N": self.N, "M": M, "flops": 2 * M * self.K * self.N}
        fns = {}
        for name in paths:
            if name == "fp16":  # cuBLAS in the run's dtype (the key keeps its historical name)
                fns[name] = (lambda i: F.linear(x, self.fp16[i]), len(self.fp16))
            elif name == "torch_int4":
                if self.tinygemm is None or M > TINYGEMM_MAX_M:  # it is far behind beyond; keep the run short
                    continue
                gs, wqs, szs = self.tinygemm
                xb = x.to(torch.bfloat16)
                fns[name] = (lambda i: torch.ops.aten._weight_int4pack_mm(xb, wqs[i], gs, szs[i]), len(wqs))
            elif name == "read":
                blocks = 4 * torch.cuda.get_device_properties(0).multi_processor_count
                sink = torch.empty(blocks * READ_FLOOR_THREADS, dtype=torch.int32, device="cuda")
                layers = [[p.qweight, p.scales] + ([p.zeros] if p.zeros is not None else []) for p in self.packed]
                fns[name] = (lambda i: read_floor(layers[i], sink), len(layers))
            elif name == "dispatched":
                row["chosen"] = self.plan.path_name(M)
            else:
                path = dispatch.PATHS[name]
                if path.max_m is not None and M > path.max_m:  # never the fastest there: keep the run short
                    continue
                fns[name] = (lambda i, path=path: path.run(x, self.packed[i], None), len(self.packed))
        row.update({f"{name}_us": us for name, us in time_interleaved(fns).items()})
        if "dispatched" in paths:
            row["dispatched_us"] = row[f"{row['chosen']}_us"]
        return row


# argparse types of the benchmark's and `hf-int4 tune`'s arguments: a bad value is a usage error before any GPU work


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def shape_list(text: str) -> list:
    """'4096x4096,4096x1024' -> [(4096, 4096), (4096, 1024)]"""
    shapes = []
    for item in text.split(","):
        k, _, n = item.partition("x")
        try:
            shapes.append((_positive(k), _positive(n)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected KxN[,KxN...] with positive K and N, got {text!r}") from None
    return shapes


def m_list(text: str) -> list:
    """'1,16,512' -> [1, 16, 512], in the order given"""
    try:
        return [_positive(m) for m in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected positive row counts M[,M...], got {text!r}") from None


def group_size(text: str) -> int:
    value = int(text)
    try:
        GPTQConfig(group_size=value)  # the format's rule
    except GPTQFormatError:
        raise argparse.ArgumentTypeError(f"expected -1 (per channel) or a positive multiple of 16, got {value}") from None
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=shape_list, default=LLAMA3_8B_SHAPES, help="KxN,...")
    parser.add_argument("--ms", type=m_list, default=DEFAULT_MS)
    parser.add_argument("--group-size", type=group_size, default=128)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--asym", action="store_true", help="asymmetric weights (zero points), not symmetric")
    parser.add_argument("--json", help="write all rows here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    bandwidth = copy_bandwidth()
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "copy_bandwidth_TBps": bandwidth / 1e12,
        "group_size": args.group_size,
        "dtype": args.dtype,
        "sym": not args.asym,
    }
    print(f"# {meta['device']}, torch {meta['torch']}, copy bandwidth {bandwidth / 1e12:.2f} TB/s, "
          f"group {args.group_size}, {args.dtype}, {'asymmetric' if args.asym else 'symmetric'}")
    print(f"{'K':>6} {'N':>6} {'M':>5} {'fp16_us':>9} {'ours_us':>9} {'ours_x':>7} {'path':>8} {'decode_x':>8} "
          f"{'dequant_x':>9} {'hopper_x':>8} {'tiny_x':>7} {'read_x':>6} {'%bw':>5} {'TFLOP/s':>8} {'fp16_TF':>7}")
    rows, passes = [], []
    for K, N in args.shapes:
        shape = Shape(K, N, args.group_size, dtype, sym=not args.asym)
        paths = shape.runnable_paths()
        pass_us = shape.time_dequantize()
        pass_pct = 100 * (shape.int4_bytes + 2 * K * N) / (pass_us * 1e-6) / bandwidth
        passes.append({"K": K, "N": N, "dequantize_us": pass_us, "pct_copy_bw": pass_pct})
        print(f"# {K}x{N}: dequantize pass {pass_us:.1f} us = {pass_pct:.0f}% of copy bandwidth "
              f"(reads the int4 weight, writes {2 * K * N / 2**20:.0f} MiB)")
        for M in args.ms:
            r = shape.time_paths(M, ["fp16", "read", "dispatched", *paths, "torch_int4"])
            for name in ("read", "dispatched", *paths, "torch_int4"):
                r[f"{name}_x"] = r["fp16_us"] / r[f"{name}_us"] if f"{name}_us" in r else None
            # bytes the decode path must move: the int4 weight + activations in + outputs out
            r["decode_pct_bw"] = 100 * (shape.int4_bytes + 2 * M * (K + N)) / (r["decode_us"] * 1e-6) / bandwidth
            r["dispatched_tflops"] = r["flops"] / (r["dispatched_us"] * 1e-6) / 1e12
            r["fp16_tflops"] = r["flops"] / (r["fp16_us"] * 1e-6) / 1e12
            rows.append(r)
            tiny = f"{r['torch_int4_x']:7.2f}" if r["torch_int4_x"] else "      -"
            # the best Hopper configuration (each one's ratio is in the JSON)
            best_hopper = max((r[k] for k in r if k.startswith("hopper") and k.endswith("_x") and r[k]), default=None)
            hopper = f"{best_hopper:8.2f}" if best_hopper else "       -"
            print(f"{K:>6} {N:>6} {M:>5} {r['fp16_us']:9.1f} {r['dispatched_us']:9.1f} {r['dispatched_x']:7.2f} "
                  f"{r['chosen']:>8} {r['decode_x']:8.2f} {r['dequant_x']:9.2f} {hopper} {tiny} {r['read_x']:6.2f} "
                  f"{r['decode_pct_bw']:5.0f} {r['dispatched_tflops']:8.1f} {r['fp16_tflops']:7.1f}", flush=True)
        del shape
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "dequantize_pass": passes, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
