"""hf_int4.read_floor.plain_read, the benchmark's read-only kernel: it must really read every word of every tensor
(its xor of them is checked against numpy's), on the GPU and on the CPU under Triton's interpreter."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

CASE = """
import numpy as np, torch
from hf_int4.read_floor import plain_read
g = torch.Generator().manual_seed({seed})
def rnd(n, dtype):
    return torch.randint(-2**31, 2**31 - 1, (n,), generator=g, dtype=torch.int32).view(dtype)
# word counts that are not multiples of the block (4096), one tensor fp16 (two halves per word), one empty
for sizes in [(5000,), (4096 * 3 + 7, 2 * 130), (1, 9000, 4096 * 9 + 1), (300, 0)]:
    ts = [rnd(n, torch.int32 if i % 2 == 0 else torch.float16).to("{device}") for i, n in enumerate(sizes)]
    want = 0
    for t in ts:
        want ^= int(np.bitwise_xor.reduce(t.view(torch.int32).cpu().numpy().astype(np.int64), initial=0))
    for poison in (0, 0x5A5A5A5A):  # the sink's previous value is xored in, not overwritten
        sink = torch.full((1,), poison, dtype=torch.int32, device="{device}")
        plain_read(ts, sink)
        got = int(sink.item())
        assert got & 0xFFFFFFFF == (want ^ poison) & 0xFFFFFFFF, (sizes, hex(got), hex(want ^ poison))
print("ok")
"""


def _run(device, seed, env=None):
    out = subprocess.run([sys.executable, "-c", CASE.format(seed=seed, device=device)], capture_output=True, text=True,
                         env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr


def test_plain_read_xors_every_word_interpreted():
    pytest.importorskip("triton")
    _run("cpu", seed=1, env={**os.environ, "TRITON_INTERPRET": "1"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_plain_read_xors_every_word_gpu():
    _run("cuda", seed=2)
