"""torch.ops.hf_int4.read_floor, the benchmark's read-only floor: it must read every word of every buffer (the xor of
its per-block sink entries is checked against the xor of the buffers' words, computed on the host), and refuse
buffers it would read wrongly."""
import numpy as np
import pytest
import torch

from hf_int4._extension import extension_available
from hf_int4.ops import read_floor

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and extension_available()),
                                reason="needs a CUDA GPU and the extension")


def _words(n, dtype, g):
    return torch.randint(-2**31, 2**31 - 1, (n,), generator=g, dtype=torch.int32).view(dtype).cuda()


def _xor(tensors):
    x = 0
    for t in tensors:
        x ^= int(np.bitwise_xor.reduce(t.view(torch.int32).cpu().numpy(), initial=0))
    return x & 0xFFFFFFFF


# 32-bit word counts (multiples of 4: whole 16-byte words): one buffer smaller than a block's stride, odd numbers of
# 16-byte words, an fp16 and a bf16 buffer, more words than one grid-stride step
@pytest.mark.parametrize("sizes,dtypes", [
    ((4,), (torch.int32,)),
    ((4 * 1001, 4 * 33), (torch.int32, torch.float16)),
    ((4 * 300_001, 4 * 7, 4 * 65_537), (torch.int32, torch.bfloat16, torch.float16)),
])
@pytest.mark.parametrize("blocks", [1, 3, 528])
def test_read_floor_reads_every_word(sizes, dtypes, blocks):
    g = torch.Generator().manual_seed(sum(sizes) + blocks)
    bufs = [_words(n, d, g) for n, d in zip(sizes, dtypes)]
    sink = _words(blocks, torch.int32, g)  # poisoned: every entry must be overwritten
    read_floor(bufs, sink)
    assert _xor([sink]) == _xor(bufs)


def test_read_floor_refuses_bad_buffers():
    sink = torch.empty(4, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="multiple of 16 bytes"):
        read_floor([torch.zeros(6, dtype=torch.int32, device="cuda")], sink)
    with pytest.raises(RuntimeError, match="one to three"):
        read_floor([torch.zeros(4, dtype=torch.int32, device="cuda")] * 4, sink)
    with pytest.raises(RuntimeError, match="sink"):
        read_floor([torch.zeros(4, dtype=torch.int32, device="cuda")], sink.float())
