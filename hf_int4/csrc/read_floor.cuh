// The floor the int4 kernels are measured against: a kernel that reads every 16-byte word of up to three buffers
// (a packed layer's weight, scales and zeros) and does nothing else. Used by torch.ops.hf_int4.read_floor (the
// benchmark's read_x) and by scripts/decode_probe.cu. The buffers are one index space (one loop: a loop per buffer
// cost ~0.1 us). Block b xors the 32-bit words it reads and stores the result to sink[b] only if it equals `key`: no
// load is dead, yet a timed run stores nothing (a store per block made the kernel ~0.15 us longer on the H200), and
// a test that passes a block's expected xor as the key sees whether that block read every word it should.
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

// Thread t of block b reads the words i = 512 b + t + 512 gridDim.x j of the concatenated buffers.
__global__ void __launch_bounds__(kReadFloorThreads) read_floor_kernel(const ReadFloorArgs b, int key, int* sink) {
  __shared__ int warp_x[kReadFloorThreads / 32];
  const int64_t n01 = b.n[0] + b.n[1], total = n01 + b.n[2];
  int x = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int4 v = __ldcs(i < b.n[0] ? b.p[0] + i : i < n01 ? b.p[1] + (i - b.n[0]) : b.p[2] + (i - n01));
    x ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  for (int o = 16; o > 0; o >>= 1) x ^= __shfl_xor_sync(0xffffffffu, x, o);
  if ((threadIdx.x & 31) == 0) warp_x[threadIdx.x >> 5] = x;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kReadFloorThreads / 32; ++w) x ^= warp_x[w];
    if (x == key) sink[blockIdx.x] = x;
  }
}

}  // namespace hf_int4
