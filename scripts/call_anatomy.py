"""Where one forced path's call goes in the benchmark's setting: a CUDA graph of calls over rotating weight copies
(hf_int4.bench), replayed under torch.profiler, each kernel's mean GPU duration and the mean gap from one call's
first kernel start to the next call's, against the graph's per-call time. Kernels launched early overlap, so the
durations may add up to more than a call.

    python scripts/call_anatomy.py K N M PATH [K N M PATH ...]    (PATH: a name of hf_int4.dispatch.PATHS)
"""
import statistics
import sys

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from hf_int4 import dispatch
from hf_int4.bench import Shape, capture_rotating, time_rotating


def kernel_kind(name: str) -> str:
    for key, kind in (("reduce_partials", "split-K sum"), ("device_kernel", "Hopper GEMM"),
                      ("stream_gemm", "streaming decode"), ("int4_gemm", "tiled decode")):
        if key in name:
            return kind
    return name[:40]


def anatomy(K: int, N: int, M: int, name: str, replays: int = 5) -> None:
    shape = Shape(K, N, 128, torch.float16)
    path = dispatch.PATHS[name]
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    copies = len(shape.packed)
    fn = lambda i: path.run(x, shape.packed[i], None)  # noqa: E731
    per_call = time_rotating(fn, copies)  # also the warm-up
    graph, calls = capture_rotating(fn, copies)  # as time_rotating timed it
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    durations, starts = {}, []
    for e in events:
        kind = kernel_kind(e.name)
        durations.setdefault(kind, []).append(e.time_range.end - e.time_range.start)
        if kind == "Hopper GEMM" or kind.endswith("decode"):
            starts.append(e.time_range.start)
    gaps = [b - a for a, b in zip(starts, starts[1:]) if b - a < 10 * per_call]  # not across replays
    parts = ", ".join(f"{kind} {statistics.mean(d):.2f} us (x{len(d) / (replays * calls):.2g} per call)"
                      for kind, d in durations.items())
    print(f"{K}x{N} M={M} {name}: {per_call:.2f} us per call (graph); start to start "
          f"{statistics.median(gaps):.2f} us; {parts}", flush=True)


def main(argv):
    if len(argv) % 4 or not argv:
        sys.exit(__doc__)
    for i in range(0, len(argv), 4):
        anatomy(int(argv[i]), int(argv[i + 1]), int(argv[i + 2]), argv[i + 3])


if __name__ == "__main__":
    main(sys.argv[1:])
