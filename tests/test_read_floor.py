"""torch.ops.hf_int4.read_floor, the benchmark's read-only floor: every thread must read exactly the 16-byte words
the grid-stride order gives it, across all buffers (a thread's xor is computed on the host and passed as the key:
that thread, and only threads with that xor, must store it), and it must refuse buffers it would read wrongly."""
import numpy as np
import pytest
import torch

from hf_int4._extension import extension_available
from hf_int4.ops import READ_FLOOR_THREADS, READ_FLOOR_TIMED_KEY, read_floor

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and extension_available()),
                                reason="needs a CUDA GPU and the extension")


def _words(n, dtype, g):
    return torch.randint(-2**31, 2**31 - 1, (n,), generator=g, dtype=torch.int32).view(dtype).cuda()


def _thread_xors(buffers, threads):
    """Each thread's xor of the 32-bit words it reads: 16-byte word i of the concatenated buffers goes to thread
    i % threads."""
    words = np.concatenate([t.view(torch.int32).cpu().numpy() for t in buffers]).reshape(-1, 4)
    units = np.bitwise_xor.reduce(words, axis=1)
    owner = np.arange(len(units)) % threads
    out = np.zeros(threads, dtype=np.int32)
    np.bitwise_xor.at(out, owner, units)
    return out


# 32-bit word counts (multiples of 4: whole 16-byte words): a buffer smaller than one block's step, odd numbers of
# 16-byte words, fp16 and bf16 buffers, several grid-stride steps
@pytest.mark.parametrize("sizes,dtypes", [
    ((4,), (torch.int32,)),
    ((4 * 1001, 4 * 33), (torch.int32, torch.float16)),
    ((4 * 300_001, 4 * 7, 4 * 65_537), (torch.int32, torch.bfloat16, torch.float16)),
])
@pytest.mark.parametrize("blocks", [1, 3, 40])
def test_read_floor_reads_every_word(sizes, dtypes, blocks):
    g = torch.Generator().manual_seed(sum(sizes) + blocks)
    bufs = [_words(n, d, g) for n, d in zip(sizes, dtypes)]
    want = _thread_xors(bufs, blocks * READ_FLOOR_THREADS)
    poison = want ^ 1
    # threads to check: the first and last, the last of a block, and random ones
    rng = np.random.default_rng(blocks)
    picks = {0, len(want) - 1, READ_FLOOR_THREADS - 1, *rng.integers(0, len(want), 16).tolist()}
    for th in sorted(picks):
        sink = torch.from_numpy(poison).cuda()
        read_floor(bufs, sink, key=int(want[th]))
        expect = np.where(want == want[th], want, poison)
        assert np.array_equal(sink.cpu().numpy(), expect), f"thread {th}"
    sink = torch.from_numpy(poison).cuda()
    read_floor(bufs, sink)  # the timed form stores only where a thread's xor is the default key (none here)
    assert np.array_equal(sink.cpu().numpy(), poison) or (want == READ_FLOOR_TIMED_KEY).any()


def test_read_floor_refuses_bad_buffers():
    sink = torch.empty(READ_FLOOR_THREADS, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="multiple of 16 bytes"):
        read_floor([torch.zeros(6, dtype=torch.int32, device="cuda")], sink)
    with pytest.raises(RuntimeError, match="one to three"):
        read_floor([torch.zeros(4, dtype=torch.int32, device="cuda")] * 4, sink)
    with pytest.raises(RuntimeError, match="sink"):
        read_floor([torch.zeros(4, dtype=torch.int32, device="cuda")], sink.float())
    with pytest.raises(RuntimeError, match="multiple of 512"):
        read_floor([torch.zeros(4, dtype=torch.int32, device="cuda")], sink[:100])
