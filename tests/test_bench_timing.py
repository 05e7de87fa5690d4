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
