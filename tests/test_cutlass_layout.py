"""The packed int4 layout is CUTLASS's reordered layout for Hopper mixed-input GEMMs, byte for byte.

CUTLASS itself (its `compute_memory_reordering_atom`, as example 55 uses it: bf16 RS GMMA, one atom,
value shuffle [0,2,4,6,1,3,5,7], tiled over (N, K)) is compiled into a small host program that prints
the offset of every (n, k) of the int4 tensor; our packer must put weight (k, n) exactly there, as the
signed int4 (q - 8) CUTLASS's int4b_t holds. Needs nvcc and the `nvidia-cutlass` headers (CPU only).
"""
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from hf_int4.formats.gptq import GPTQConfig
from hf_int4.formats.gptq_writer import random_gptq_layer
from hf_int4.packing import pack_gptq_layer_cpu, padded_sizes


def cutlass_include() -> Path:
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "source"
    return path if (path / "include" / "cute" / "tensor.hpp").is_file() else None


NVCC = shutil.which("nvcc")
CUTLASS = cutlass_include()
pytestmark = pytest.mark.skipif(NVCC is None or CUTLASS is None, reason="needs nvcc and pip install --no-deps nvidia-cutlass")

PROGRAM = r"""
#include <cstdio>
#include <cstdlib>
#include "cute/tensor.hpp"
#include "cute/atom/mma_atom.hpp"
#include "cute/atom/mma_traits_sm90_gmma.hpp"
namespace cutlass {
%(reordering_atom)s
}
using namespace cute;
using StrideB = Stride<int64_t, Int<1>, int64_t>;  // the int4 operand, K-major, as in example 55
using ValueShuffle = Layout<Shape<_2, _4>, Stride<_4, _1>>;  // order [0,2,4,6,1,3,5,7]
using AtomQuant = decltype(cutlass::compute_memory_reordering_atom<cutlass::bfloat16_t, Layout<Shape<_1, _1>>, ValueShuffle>());
int main(int argc, char** argv) {
  const int n = atoi(argv[1]), k = atoi(argv[2]);
  auto layout = tile_to_shape(AtomQuant{}, make_shape(n, k, 1));
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < k; ++j) printf("%%d\n", int(layout(i, j, 0)));
}
"""


def reordering_atom_source() -> str:
    """compute_memory_reordering_atom from CUTLASS's own header. (That header also pulls in curand through
    its test-fill utilities, which a CPU machine may lack, so the function is compiled on its own.)"""
    text = (CUTLASS / "tools/util/include/cutlass/util/mixed_dtype_utils.hpp").read_text()
    match = re.search(r"template <class ElementMma,\s*class AtomLayout.*?\n}\n", text, re.S)
    assert match, "compute_memory_reordering_atom not found in this CUTLASS"
    return match.group(0)


@pytest.fixture(scope="module")
def cutlass_offsets(tmp_path_factory):
    work = tmp_path_factory.mktemp("cutlass_layout")
    (work / "layout.cu").write_text(PROGRAM % {"reordering_atom": reordering_atom_source()})
    subprocess.run([NVCC, "-std=c++17", "-arch=sm_90a", f"-I{CUTLASS / 'include'}", "layout.cu", "-o", "layout"],
                   cwd=work, check=True, capture_output=True)

    def offsets(n: int, k: int) -> torch.Tensor:
        out = subprocess.run([str(work / "layout"), str(n), str(k)], check=True, capture_output=True, text=True)
        return torch.tensor(list(map(int, out.stdout.split())), dtype=torch.int64).reshape(n, k)

    return offsets


@pytest.mark.parametrize("K,N", [(128, 128), (576, 1536), (200, 264)])
def test_packed_weight_is_cutlass_reordered_int4(cutlass_offsets, K, N):
    layer, raw = random_gptq_layer(K, N, GPTQConfig(group_size=32 if K % 64 else 64), seed=K)
    qweight = pack_gptq_layer_cpu(layer, torch.float16).qweight
    k_pad, n_pad = padded_sizes(K, N)
    offset = cutlass_offsets(n_pad, k_pad)  # int4 elements, [n, k]
    assert torch.equal(torch.sort(offset.reshape(-1)).values, torch.arange(n_pad * k_pad)), "a bijection"
    words = qweight.reshape(-1).to(torch.int64) & 0xFFFFFFFF
    nibble = (words[offset // 8] >> (4 * (offset % 8))) & 15
    signed = torch.where(nibble >= 8, nibble - 16, nibble)  # int4b_t
    want = torch.full((n_pad, k_pad), 0, dtype=torch.int64)  # padding: q = 8, i.e. 0
    want[:N, :K] = raw["intweight"].T.to(torch.int64) - 8
    assert torch.equal(signed, want)
