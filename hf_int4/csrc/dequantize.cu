// Dequantize the packed int4 weight into W^T [size_n, size_k] (fp16 / bf16) for dequantize-then-cuBLAS,
// the path for large M on GPUs without the Hopper kernel and for groups that kernel cannot take.
//
// One block per 64 columns x 128 rows of K: each of the 256 threads loads its lane's word of the four
// 16x16 atoms (32 weights) of one k-block of the packed layout (kernels.h), dequantizes into a shared
// [64 n][128 k] tile (a word holds (k, k+1) pairs of one column, so each pair is one 4-byte store), then
// the tile is written out row by row as 16-byte vectors: a plain stream, read 0.5 + write 2 bytes a weight.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"

namespace hf_int4 {
namespace {

constexpr int kTileN = 64, kTileK = 128, kThreads = 256;
constexpr int kRowPad = 8;  // halves of padding per shared row: keeps the 16-byte reads conflict-light

template <typename T> struct Pair;
template <> struct Pair<__half> {
  using T2 = __half2;
  static __device__ T2 make(float a, float b) { return __floats2half2_rn(a, b); }
  static __device__ float to_float(__half x) { return __half2float(x); }
  static constexpr float kMagic = 1024.f;
};
template <> struct Pair<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static __device__ T2 make(float a, float b) { return __floats2bfloat162_rn(a, b); }
  static __device__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static constexpr float kMagic = 128.f;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) dequantize_kernel(const uint32_t* __restrict__ b, const T* __restrict__ scales,
                                                               const T* __restrict__ zeros, T* __restrict__ w,
                                                               int size_n, int size_k, int n_pad, int k_pad,
                                                               int group_size) {
  using P = Pair<T>;
  __shared__ __align__(16) T tile[kTileN][kTileK + kRowPad];
  const int nb = blockIdx.x;                  // 64-column group
  const int kb = blockIdx.y * (kTileK / 16) + threadIdx.x / 32;  // this thread's 16-row k-block
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int kb_local = threadIdx.x / 32;
  if (kb < k_pad / 16) {
    // atom a = 4 nb + j of row kb: words 32 a .. 32 a + 31 of the row's n_pad * 2
    const uint32_t* row = b + static_cast<int64_t>(kb) * n_pad * 2 + nb * 128 + lane;
    const int grp = kb * 16 / group_size;  // a 16-row k-block never straddles a group (group_size >= 16)
    uint32_t words[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) words[j] = row[32 * j];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t sidx = static_cast<int64_t>(grp) * n_pad + nb * 64 + 16 * j + 8 * h + g;
        const float s = P::to_float(scales[sidx]);
        const float z = zeros != nullptr ? P::to_float(zeros[sidx]) - P::kMagic : 8.f;
        const int n_local = 16 * j + 8 * h + g;
#pragma unroll
        for (int upper = 0; upper < 2; ++upper) {
          // nibble slot 4 odd + 2 upper + h holds k = 2 t + odd + 8 upper, as q ^ 8
          const float q0 = static_cast<float>(((words[j] >> (4 * (2 * upper + h))) & 15u) ^ 8u);
          const float q1 = static_cast<float>(((words[j] >> (4 * (4 + 2 * upper + h))) & 15u) ^ 8u);
          const int k_local = kb_local * 16 + 2 * t + 8 * upper;
          *reinterpret_cast<typename P::T2*>(&tile[n_local][k_local]) = P::make((q0 - z) * s, (q1 - z) * s);
        }
      }
    }
  }
  __syncthreads();
  // write out: 64 rows x 16 vectors of 8 values; size_k % 8 == 0, so a vector is wholly in or out
  const int k0 = blockIdx.y * kTileK;
  for (int v = threadIdx.x; v < kTileN * (kTileK / 8); v += kThreads) {
    const int n_local = v / (kTileK / 8), k_local = (v % (kTileK / 8)) * 8;
    const int n = nb * kTileN + n_local, k = k0 + k_local;
    if (n < size_n && k < size_k) {
      *reinterpret_cast<int4*>(&w[static_cast<int64_t>(n) * size_k + k]) =
          *reinterpret_cast<const int4*>(&tile[n_local][k_local]);
    }
  }
}

template <typename T>
const char* launch(const void* b, const void* scales, const void* zeros, void* w, int size_n, int size_k, int n_pad,
                   int k_pad, int group_size, cudaStream_t stream) {
  if (size_n == 0 || size_k == 0) return nullptr;
  if (size_k % 8) return "hf_int4::dequantize_int4: size_k must be a multiple of 8";
  const dim3 grid(n_pad / kTileN, (k_pad + kTileK - 1) / kTileK);
  if (grid.y > 65535) return "hf_int4::dequantize_int4: size_k too large";
  dequantize_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const uint32_t*>(b), static_cast<const T*>(scales),
                                                      static_cast<const T*>(zeros), static_cast<T*>(w), size_n,
                                                      size_k, n_pad, k_pad, group_size);
  return nullptr;
}

}  // namespace

const char* dequantize_int4_fp16(const void* b, const void* scales, const void* zeros, void* w, int size_n,
                                 int size_k, int n_pad, int k_pad, int group_size, cudaStream_t stream) {
  return launch<__half>(b, scales, zeros, w, size_n, size_k, n_pad, k_pad, group_size, stream);
}

const char* dequantize_int4_bf16(const void* b, const void* scales, const void* zeros, void* w, int size_n,
                                 int size_k, int n_pad, int k_pad, int group_size, cudaStream_t stream) {
  return launch<__nv_bfloat16>(b, scales, zeros, w, size_n, size_k, n_pad, k_pad, group_size, stream);
}

}  // namespace hf_int4
