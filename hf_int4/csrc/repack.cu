// GPU repack: GPTQ qweight int32 [K/8, N] (+ optional act-order row permutation) -> the packed layout
// documented in kernels.h. One thread per packed int32; bit-identical to hf_int4.packing's CPU packer.
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"

namespace hf_int4 {
namespace {

__global__ void repack_gptq_kernel(const int32_t* __restrict__ qweight, const int32_t* __restrict__ perm,
                                   int32_t* __restrict__ out, int size_k, int size_n, int k_pad, int n_pad) {
  const int64_t row_words = static_cast<int64_t>(n_pad) * 2;
  const int64_t total = static_cast<int64_t>(k_pad / 16) * row_words;
  for (int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; o < total;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int kb = static_cast<int>(o / row_words);
    const int r = static_cast<int>(o % row_words);
    const int a = r / 32;          // 16-column atom
    const int lane = r % 32;
    const int g = lane / 4, t = lane % 4;
    uint32_t word = 0;
#pragma unroll
    for (int slot = 0; slot < 8; ++slot) {
      const int odd = slot / 4, upper = (slot / 2) % 2, h = slot % 2;
      const int k = kb * 16 + 2 * t + odd + 8 * upper;
      const int n = a * 16 + 8 * h + g;
      uint32_t nib = 8;  // padding: q = 8
      if (k < size_k && n < size_n) {
        const int src = perm != nullptr ? perm[k] : k;
        const uint32_t w = static_cast<uint32_t>(qweight[static_cast<int64_t>(src / 8) * size_n + n]);
        nib = (w >> (4 * (src % 8))) & 15u;
      }
      word |= (nib ^ 8u) << (4 * slot);  // signed int4 (CUTLASS's int4b_t): q - 8
    }
    out[o] = static_cast<int32_t>(word);
  }
}

}  // namespace

const char* repack_gptq_launch(const int32_t* qweight, const int32_t* perm, int32_t* out, int size_k,
                               int size_n, int k_pad, int n_pad, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(k_pad / 16) * n_pad * 2;
  if (total == 0) return nullptr;
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  const int grid = static_cast<int>(blocks < 65535 * 16 ? blocks : 65535 * 16);
  repack_gptq_kernel<<<grid, threads, 0, stream>>>(qweight, perm, out, size_k, size_n, k_pad, n_pad);
  return nullptr;
}

}  // namespace hf_int4
