"""hf_int4.bench.time_interleaved on the CPU, with CUDA graphs, streams and events replaced by a simulated clock:
each path's per-call time must come back under its own name, whatever order the rounds replay the graphs in."""
import contextlib
import random

import pytest
import torch

from hf_int4 import bench


class FakeCuda:
    """Graphs record the calls made while capturing; replaying one advances a clock by their costs; events read it.
    `replayed` keeps the order in which graphs were replayed."""

    def __init__(self):
        self.clock = 0.0
        self.capturing = None
        self.replayed = []
        fake = self

        class Graph:
            def __init__(self):
                self.costs = []

            def replay(self):
                fake.replayed.append(self)
                fake.clock += sum(self.costs)

        class Event:
            def __init__(self, **kwargs):
                self.t = None

            def record(self):
                self.t = fake.clock

            def synchronize(self):
                pass

            def elapsed_time(self, other):  # ms, as torch.cuda.Event
                return (other.t - self.t) / 1e3

        @contextlib.contextmanager
        def graph(g):
            fake.capturing = g
            yield
            fake.capturing = None

        class Stream:
            def wait_stream(self, other):
                pass

        self.patches = {
            "CUDAGraph": Graph, "graph": graph, "Event": Event, "Stream": Stream,
            "current_stream": lambda: Stream(), "stream": lambda s: contextlib.nullcontext(),
            "synchronize": lambda: None,
        }

    def path(self, us_per_call):
        """fn(i) for time_interleaved: a call that costs `us_per_call` when captured."""
        def fn(i):
            if self.capturing is not None:
                self.capturing.costs.append(us_per_call)
        return fn


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = FakeCuda()
    for name, value in fake.patches.items():
        monkeypatch.setattr(torch.cuda, name, value)
    return fake


def test_each_path_gets_its_own_time(fake_cuda):
    rng = random.Random(7)
    costs = {f"path{i}": rng.uniform(1, 500) for i in range(9)}
    fns = {name: (fake_cuda.path(us), rng.randint(2, 6)) for name, us in costs.items()}
    measured = bench.time_interleaved(fns, replays=5)
    assert measured.keys() == costs.keys()
    for name, us in costs.items():
        assert measured[name] == pytest.approx(us, rel=1e-9), name


def test_rounds_replay_in_varying_orders_each_timed_after_a_warm_replay(fake_cuda):
    fns = {name: (fake_cuda.path(us), 2) for name, us in (("a", 1.0), ("b", 2.0), ("c", 3.0), ("d", 4.0))}
    bench.time_interleaved(fns, replays=6)
    timed = fake_cuda.replayed[len(fns):]  # after one capture check replay per graph
    assert len(timed) == 2 * 6 * len(fns)
    pairs = list(zip(timed[::2], timed[1::2]))
    assert all(warm is run for warm, run in pairs)  # every timed replay right after an untimed one of itself
    rounds = [tuple(id(g) for g, _ in pairs[r * len(fns):(r + 1) * len(fns)]) for r in range(6)]
    assert all(len(set(r)) == len(fns) for r in rounds)  # each round replays every path once
    assert len(set(rounds)) > 1  # and not always in the same order


def test_timed_replay_reads_each_copy_again_only_after_all_the_others(fake_cuda):
    """The timed replay follows an untimed one of the same graph: across that seam too, a copy is read again only
    after every other copy (the rotation's > 4x L2 between two reads of one weight), whatever the number of copies."""
    for copies in range(2, 30):
        calls_of = {}

        def fn(i):
            if fake_cuda.capturing is not None:
                fake_cuda.capturing.costs.append(1.0)
                calls_of.setdefault(id(fake_cuda.capturing), []).append(i)

        fake_cuda.replayed.clear()
        bench.time_interleaved({"a": (fn, copies)}, replays=2)
        sequence = [i for graph in fake_cuda.replayed for i in calls_of[id(graph)]]
        assert sorted(set(sequence)) == list(range(copies))
        last = {}
        for t, i in enumerate(sequence):
            if i in last:
                assert t - last[i] >= copies, (copies, t, i)
            last[i] = t


@pytest.fixture
def cpu_shape(monkeypatch):
    """bench.Shape built on the CPU: CUDA device arguments dropped, a 1 MiB "L2", no dispatch table."""
    import types

    import hf_int4.formats.gptq_writer as gptq_writer

    for name in ("randn", "randint", "rand"):
        original = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, device=None, _f=original, **k: _f(*a, **k))
    original_layer = gptq_writer.random_gptq_layer
    monkeypatch.setattr(gptq_writer, "random_gptq_layer", lambda *a, device=None, **k: original_layer(*a, **k))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda *a: types.SimpleNamespace(L2_cache_size=2**20, multi_processor_count=4))
    monkeypatch.setattr(bench.dispatch, "plan_for", lambda spec, device: types.SimpleNamespace(path_name=lambda m: "decode"))
    monkeypatch.setattr(torch.ops.aten, "_convert_weight_to_int4pack", lambda q, inner: q.clone(), raising=False)
    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm", lambda x, w, gs, sz: x, raising=False)

    def calls_made(shape, M, paths):
        """{path: [the arguments of each fn(i), i over its copies]} of shape.time_paths, nothing timed."""
        made = {}

        def fake_interleaved(fns, calls=0, replays=7):
            for name, (fn, copies) in fns.items():
                made[name] = []
                for i in range(copies):
                    spy = lambda *args, **kwargs: made[name].append(args) or args[0]  # noqa: E731
                    with monkeypatch.context() as m:
                        m.setattr(bench.F, "linear", spy)
                        m.setattr(torch.ops.aten, "_weight_int4pack_mm", spy, raising=False)
                        fn(i)
            return {name: 1.0 for name in fns}

        monkeypatch.setattr(bench, "time_interleaved", fake_interleaved)
        shape.time_paths(M, paths)
        return made

    return calls_made


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cublas_baseline_runs_in_the_run_dtype(cpu_shape, dtype):
    shape = bench.Shape(256, 256, 128, dtype)
    calls = cpu_shape(shape, 4, ["fp16"])["fp16"]
    assert calls and all(x.dtype == w.dtype == dtype for x, w in calls)


def test_torch_int4_rotates_its_scales_with_its_weights(cpu_shape):
    shape = bench.Shape(256, 256, 128, torch.float16)
    calls = cpu_shape(shape, 4, ["torch_int4"])["torch_int4"]
    assert len(calls) >= 2
    assert len({sz.data_ptr() for _, _, _, sz in calls}) == len(calls)  # every copy its own scales and zeros
    assert len({w.data_ptr() for _, w, _, _ in calls}) == len(calls)
