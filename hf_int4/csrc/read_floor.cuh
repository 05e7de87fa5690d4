// The floor the int4 kernels are measured against: a kernel that reads every 16-byte word of up to three buffers
// (a packed layer's weight, scales and zeros) and does nothing else. Used by torch.ops.hf_int4.read_floor (the
// benchmark's read_x) and by scripts/decode_probe.cu. Each block writes the xor of the 32-bit words it read to
// its own sink entry (no atomics, no zeroing), so no load is dead and a test can check that every word was read.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace hf_int4 {

constexpr int kReadFloorBuffers = 3;
constexpr int kReadFloorThreads = 512;

struct ReadFloorArgs {
  const int4* p[kReadFloorBuffers];  // 16-byte aligned
  int64_t n[kReadFloorBuffers];      // 16-byte words (0: unused)
};

__global__ void __launch_bounds__(kReadFloorThreads) read_floor_kernel(const ReadFloorArgs b, int* sink) {
  __shared__ int warp_x[kReadFloorThreads / 32];
  int x = 0;
#pragma unroll
  for (int j = 0; j < kReadFloorBuffers; ++j)
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < b.n[j]; i += int64_t(gridDim.x) * blockDim.x) {
      const int4 v = __ldcs(b.p[j] + i);
      x ^= v.x ^ v.y ^ v.z ^ v.w;
    }
  for (int o = 16; o > 0; o >>= 1) x ^= __shfl_xor_sync(0xffffffffu, x, o);
  if ((threadIdx.x & 31) == 0) warp_x[threadIdx.x >> 5] = x;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kReadFloorThreads / 32; ++w) x ^= warp_x[w];
    sink[blockIdx.x] = x;
  }
}

}  // namespace hf_int4
