"""torch.ops.hf_int4.read_floor, the benchmark's read-only floor: every block must read exactly the 16-byte words
the grid-stride order gives it, across all buffers (each block's xor is computed on the host and passed as the key:
that block, and only blocks with that xor, must store it), and it must refuse buffers it would read wrongly."""
import numpy as np
import pytest
import torch

from hf_int4._extension import extension_available
from hf_int4.ops import read_floor

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and extension_available()),
                                reason="needs a CUDA GPU and the extension")
THREADS = 512  # read_floor.cuh's kReadFloorThreads


def _words(n, dtype, g):
    return torch.randint(-2**31, 2**31 - 1, (n,), generator=g, dtype=torch.int32).view(dtype).cuda()


def _block_xors(buffers, blocks):
    """Each block's xor of the 32-bit words it reads: 16-byte word i of the concatenated buffers goes to block
    (i // THREADS) % blocks."""
    words = np.concatenate([t.view(torch.int32).cpu().numpy() for t in buffers]).reshape(-1, 4)
    units = np.bitwise_xor.reduce(words, axis=1)
    owner = (np.arange(len(units)) // THREADS) % blocks
    return [int(np.bitwise_xor.reduce(units[owner == b], initial=0)) for b in range(blocks)]


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
    want = _block_xors(bufs, blocks)
    poison = [w ^ 1 for w in want]
    for b in range(blocks):
        sink = torch.tensor(poison, dtype=torch.int32, device="cuda")
        read_floor(bufs, sink, key=want[b])
        got = sink.tolist()
        assert got == [w if w == want[b] else p for w, p in zip(want, poison)], f"block {b}"
    sink = torch.tensor(poison, dtype=torch.int32, device="cuda")
    read_floor(bufs, sink)  # the timed form: no block's xor is the default key here, so nothing is stored
    assert sink.tolist() == poison or 0x12345678 in want


def test_read_floor_refuses_bad_buffers():
    sink = torch.empty(4, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="multiple of 16 bytes"):
        read_floor([torch.zeros(6, dtype=torch.int32, device="cuda")], sink)
    with pytest.raises(RuntimeError, match="one to three"):
        read_floor([torch.zeros(4, dtype=torch.int32, device="cuda")] * 4, sink)
    with pytest.raises(RuntimeError, match="sink"):
        read_floor([torch.zeros(4, dtype=torch.int32, device="cuda")], sink.float())
