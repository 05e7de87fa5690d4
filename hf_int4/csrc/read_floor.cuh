// The floor the int4 kernels are measured against: a kernel that reads every 16-byte word of up to three buffers
// (a packed layer's weight, scales and zeros) and does nothing else. Used by torch.ops.hf_int4.read_floor (the
// benchmark's read_x) and by scripts/decode_probe.cu. The buffers are one index space, one loop. Each thread xors
// the 32-bit words it reads and stores the result to its own sink entry only if it equals `key`: no load is dead, yet
// a timed run stores nothing, and a test that passes a thread's expected xor as the key sees whether that thread read
// every word it should. (A reduction over the block, or a store per block or warp, made the read ~0.15-0.25 us
// slower on the H200.) It launches early and lets the next kernel start once its loads are issued, as the GEMMs do
// (read_floor.cu), so in the benchmark's chained calls it bounds them.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "gemm_common.cuh"
#include "kernels.h"

namespace hf_int4 {

struct ReadFloorArgs {
  const int4* p[kReadFloorBuffers];  // 16-byte aligned
  int64_t n[kReadFloorBuffers];      // 16-byte words (0: unused)
};

// Thread g = 512 b + t (block b) reads the words g + 512 gridDim.x j of the concatenated buffers; sink has one entry
// per thread.
__global__ void read_floor_kernel(const ReadFloorArgs b, int key, int* sink) {
  const int64_t n01 = b.n[0] + b.n[1], total = n01 + b.n[2];
  const int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  int x = 0;
  for (int64_t i = g; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int4 v = __ldcs(i < b.n[0] ? b.p[0] + i : i < n01 ? b.p[1] + (i - b.n[0]) : b.p[2] + (i - n01));
    x ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  gemm::launch_dependents();  // as the GEMMs do once their loads are issued: the next call may start during this tail
  if (x == key) sink[g] = x;
}

}  // namespace hf_int4
