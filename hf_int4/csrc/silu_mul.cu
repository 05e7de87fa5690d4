// A gated MLP's input to its down projection for more rows than the streaming kernel takes (prefill):
// out[r, j] = silu(h[r, j]) * h[r, up_offset + j], j < size_k, from the fused gate/up GEMM's output h as it lies.
// One pass: read the gate and up slices, write out (3 x 2 bytes a value), where torch's silu and multiply make
// two passes over 5 x 2 bytes. Formed by gemm::silu_mul, as the streaming kernel forms it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "gemm_common.cuh"
#include "kernels.h"

namespace hf_int4 {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 4096;  // grid-stride beyond: enough to fill any GPU's SMs several times over

// VALUES per thread and step: 8 (16-byte loads and stores) where every row start and both slices are 16-byte aligned,
// else 1 (a value in the low half of a word; its high half is zero).
template <typename T, int VALUES>
__global__ void __launch_bounds__(kThreads) silu_mul_kernel(const uint16_t* __restrict__ h, uint16_t* __restrict__ out,
                                                            int64_t rows, int size_k, int64_t ldh, int up_offset) {
  const int64_t steps_per_row = size_k / VALUES, total = rows * steps_per_row;
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < total; i += int64_t(gridDim.x) * kThreads) {
    const int64_t r = i / steps_per_row, c = (i - r * steps_per_row) * VALUES;
    const uint16_t* gate = h + r * ldh + c;
    uint16_t* dst = out + r * size_k + c;
    if constexpr (VALUES == 8) {
      const uint4 g = *reinterpret_cast<const uint4*>(gate), u = *reinterpret_cast<const uint4*>(gate + up_offset);
      *reinterpret_cast<uint4*>(dst) = make_uint4(gemm::silu_mul<T>(g.x, u.x), gemm::silu_mul<T>(g.y, u.y),
                                                  gemm::silu_mul<T>(g.z, u.z), gemm::silu_mul<T>(g.w, u.w));
    } else {
      *dst = static_cast<uint16_t>(gemm::silu_mul<T>(*gate, gate[up_offset]));
    }
  }
}

template <typename T>
const char* launch(const void* h, void* out, int64_t rows, int size_k, int64_t ldh, int up_offset,
                   cudaStream_t stream) {
  if (rows == 0) return nullptr;
  const bool wide = size_k % 8 == 0 && ldh % 8 == 0 && up_offset % 8 == 0 && reinterpret_cast<uintptr_t>(h) % 16 == 0;
  const int values = wide ? 8 : 1;
  const int64_t steps = rows * (size_k / values);
  const int blocks = static_cast<int>(std::min<int64_t>((steps + kThreads - 1) / kThreads, kMaxBlocks));
  const auto kernel = wide ? silu_mul_kernel<T, 8> : silu_mul_kernel<T, 1>;
  kernel<<<blocks, kThreads, 0, stream>>>(static_cast<const uint16_t*>(h), static_cast<uint16_t*>(out), rows, size_k,
                                          ldh, up_offset);
  return cudaGetLastError() == cudaSuccess ? nullptr : "hf_int4::silu_mul: launch failed";
}

}  // namespace

const char* silu_mul_fp16(const void* h, void* out, int64_t rows, int size_k, int64_t ldh, int up_offset,
                          cudaStream_t stream) {
  return launch<__half>(h, out, rows, size_k, ldh, up_offset, stream);
}

const char* silu_mul_bf16(const void* h, void* out, int64_t rows, int size_k, int64_t ldh, int up_offset,
                          cudaStream_t stream) {
  return launch<__nv_bfloat16>(h, out, rows, size_k, ldh, up_offset, stream);
}

}  // namespace hf_int4
