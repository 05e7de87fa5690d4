"""The benchmark's ceiling (hf_int4.bench, read_x): one kernel that reads every byte of a packed layer (weight,
scales, zeros) and does nothing else, so fp16's time over its time is the most any separate int4 kernel could reach
on this GPU. Triton, imported only when timed: not a product kernel."""
import torch
import triton
import triton.language as tl

BLOCK = 4096  # 32-bit words per program and step: 16 per thread at 8 warps, four 16-byte loads in flight


@triton.jit
def _read_kernel(a, n_a, b, n_b, c, n_c, sink, BLOCK: tl.constexpr):
    # grid-stride over a, then b, then c; the xor of every word goes to sink so that no load is dead
    pid, step = tl.program_id(0), tl.num_programs(0) * BLOCK
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(pid * BLOCK, n_a, step):
        offs = start + tl.arange(0, BLOCK)
        acc ^= tl.load(a + offs, mask=offs < n_a, other=0, cache_modifier=".cg")
    for start in range(pid * BLOCK, n_b, step):
        offs = start + tl.arange(0, BLOCK)
        acc ^= tl.load(b + offs, mask=offs < n_b, other=0, cache_modifier=".cg")
    for start in range(pid * BLOCK, n_c, step):
        offs = start + tl.arange(0, BLOCK)
        acc ^= tl.load(c + offs, mask=offs < n_c, other=0, cache_modifier=".cg")
    tl.atomic_xor(sink, tl.xor_sum(acc, axis=0))


def plain_read(tensors, sink: torch.Tensor) -> None:
    """xors every 32-bit word of one to three contiguous tensors (whole words each) into sink (int32 [1])."""
    words = [t.view(torch.int32).reshape(-1) for t in tensors]
    if not 1 <= len(words) <= 3:
        raise ValueError(f"plain_read takes one to three tensors, got {len(words)}")
    while len(words) < 3:
        words.append(words[0][:0])
    # four programs per SM; on the CPU (Triton's interpreter, TRITON_INTERPRET=1: the tests) a few
    sms = torch.cuda.get_device_properties(sink.device).multi_processor_count if sink.is_cuda else 1
    programs = 4 * sms
    _read_kernel[(programs,)](words[0], words[0].numel(), words[1], words[1].numel(), words[2], words[2].numel(), sink,
                              BLOCK=BLOCK, num_warps=8)
