// Device helpers shared by the int4 GEMM kernels (decode_gemm.cuh: the tiled kernel, stream_gemm.cuh: the
// small-M streaming kernel; the Hopper path's split-K sum): programmatic-dependent-launch controls and launch,
// the lop3 nibble decode and the activation dtype specifics (magic numbers, mma, conversions).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>
#include <utility>

namespace hf_int4 {
namespace gemm {

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int cmax(int a, int b) { return a > b ? a : b; }

// Programmatic dependent launch (sm_90): wait until the preceding kernel has completed and its writes are
// visible (a no-op when not launched early); let the following kernel launch early.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Launches kernel<<<grid, block, smem, stream>>>(args...), early (programmatic stream serialization) when `early`:
// the kernel must then call grid_dependency_wait() before it reads what the preceding kernel writes.
template <typename... Params, typename... Args>
inline cudaError_t launch_maybe_early(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                      cudaStream_t stream, bool early, Args&&... args) {
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = early ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

// Split-reduction handshake of both kernels: publishes the fp32 partial this block has just stored and counts
// its arrival on `counter`; true only in the block that completes the `blocks` arrivals, which may then read every
// partial (it sums them in a fixed order, so results do not depend on the arrival order) and resets the counter.
__device__ __forceinline__ bool arrives_last(int* counter, int blocks) {
  __shared__ int s_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) s_last = atomicAdd(counter, 1) == blocks - 1;
  __syncthreads();
  if (!s_last) return false;
  __threadfence();
  return true;
}

// Two weights q (0..15), stored as signed nibbles q ^ 8 in bits pos..pos+3 and pos+16..pos+19 of x, as
// magic + 2^pos q in both halves: ((x ^ c) & m) | (c & ~m) with m = 0x000f000f << pos, c = magic | 0x00080008 << pos,
// one lop3. pos = 0: magic + q.
template <uint32_t kMagic2, int kPos = 0>
__device__ __forceinline__ uint32_t raw_pair(uint32_t x) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, %4;\n"
      : "=r"(r)
      : "r"(x), "r"(0x000f000fu << kPos), "r"(kMagic2 | (0x00080008u << kPos)),
        "n"(((0xf0 ^ 0xaa) & 0xcc) | (0xaa & ~0xcc & 0xff)));
  return r;
}

// ------------------------------------------------------------------------------- dtype specifics

template <typename T>
struct Act;

template <>
struct Act<__half> {
  static constexpr uint32_t kMagic2 = 0x64006400u;    // 1024.0 | 1024.0: (q | magic) = 1024 + q
  static constexpr uint32_t kSymZero2 = 0x64086408u;  // 1032.0 = magic + 8
  using T2 = __half2;
  template <int hi>
  __device__ static __forceinline__ T2 broadcast(T2 x) { return hi ? __high2half2(x) : __low2half2(x); }
  __device__ static __forceinline__ void mma(const uint32_t (&a)[4], uint32_t b0, uint32_t b1, float (&c)[4]) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ static __forceinline__ float to_float(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
  __device__ static __forceinline__ uint16_t from_float(float f) { return __half_as_ushort(__float2half_rn(f)); }
};

template <>
struct Act<__nv_bfloat16> {
  static constexpr uint32_t kMagic2 = 0x43004300u;    // 128.0 | 128.0 (7 mantissa bits): 128 + q
  static constexpr uint32_t kSymZero2 = 0x43084308u;  // 136.0 = magic + 8
  using T2 = __nv_bfloat162;
  template <int hi>
  __device__ static __forceinline__ T2 broadcast(T2 x) { return hi ? __high2bfloat162(x) : __low2bfloat162(x); }
  __device__ static __forceinline__ void mma(const uint32_t (&a)[4], uint32_t b0, uint32_t b1, float (&c)[4]) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ static __forceinline__ float to_float(uint16_t bits) {
    return __bfloat162float(__ushort_as_bfloat16(bits));
  }
  __device__ static __forceinline__ uint16_t from_float(float f) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  }
};

// silu(gate) * up of the two 16-bit values in each word, as h (1 + tanh h) * up with h = gate / 2 and the hardware's
// approximate tanh: one MUFU op per value (fp16: per word, in packed f16x2 math) against an exp, a divide and the
// conversions in exact fp32, which made the streaming kernel's M = 1 case, whose every CTA forms all of K, bound by
// them (H100: 19.6 against 15.2 us for a separate silu-and-multiply kernel plus the GEMM, kernel notes step 46).
// tanh.approx's relative error (~2^-11) is that of fp16's rounding. The streaming kernel (gated input) and
// silu_mul.cu (more rows) both form it here, so a gated MLP's input has the same bits at every M.
template <typename T>
__device__ __forceinline__ uint32_t silu_mul(uint32_t gate, uint32_t up) {
  uint32_t r;
  if constexpr (std::is_same_v<T, __half>) {
    uint32_t h, t, s;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(h) : "r"(gate), "r"(0x38003800u));  // x 0.5: exact
    asm("tanh.approx.f16x2 %0, %1;" : "=r"(t) : "r"(h));
    asm("fma.rn.f16x2 %0, %1, %2, %1;" : "=r"(s) : "r"(h), "r"(t));
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(s), "r"(up));
  } else {  // bf16 -> fp32 is a shift; fp32 tanh keeps bf16's range; one conversion back per word
    using D = Act<T>;
    float v[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float h = 0.5f * D::to_float(static_cast<uint16_t>(gate >> 16 * i));
      const float u = D::to_float(static_cast<uint16_t>(up >> 16 * i));
      float t;
      asm("tanh.approx.f32 %0, %1;" : "=f"(t) : "f"(h));
      v[i] = fmaf(h, t, h) * u;
    }
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(v[1]), "f"(v[0]));
  }
  return r;
}

}  // namespace gemm
}  // namespace hf_int4
