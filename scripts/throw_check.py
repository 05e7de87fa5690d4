"""Does a TORCH_CHECK failure inside hf_int4._C reach Python as a RuntimeError (not a crash)?"""
import torch

from hf_int4 import ops  # noqa: F401  (loads the extension)

x = torch.randn(2, 64, dtype=torch.float16, device="cuda")
try:
    torch.ops.hf_int4.repack_gptq(torch.zeros(3, 64, dtype=torch.int32, device="cuda"), None, 64, 64)
except RuntimeError as exc:
    print("repack_gptq raised:", str(exc).splitlines()[0])
ws = torch.zeros(1000, dtype=torch.int32, device="cuda")
q = torch.zeros(4, 256, dtype=torch.int32, device="cuda")
s = torch.zeros(1, 128, dtype=torch.float16, device="cuda")
try:
    torch.ops.hf_int4.int4_gemm(x, q, s, None, ws, 64, 64, -1, None)
except RuntimeError as exc:
    print("int4_gemm raised:", str(exc).splitlines()[0])
print("throw_check: done")
