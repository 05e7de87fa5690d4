// Host API of the Hopper large-batch kernel (CUTLASS, TMA + wgmma), shared by hopper_ops.cpp and the
// translation units of its configurations. It reads the packed weight of kernels.h as it is: that layout is
// CUTLASS's reordered int4b_t layout for register-sourced wgmma.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace hf_int4 {

struct HopperGemmArgs {
  const void* a = nullptr;       // [m, k] activation dtype, row-major
  const void* b = nullptr;       // packed int32 [k / 16, n * 2] (kernels.h)
  const void* scales = nullptr;  // [ceil(k / group_size), n] activation dtype, natural column order
  const void* zeros = nullptr;   // the scales' shape, (magic + z) (kernels.h): asymmetric layers; nullptr: symmetric
  const void* bias = nullptr;    // [n] or nullptr
  void* c = nullptr;             // [m, n]
  void* workspace = nullptr;
  float* partials = nullptr;     // partial-sum schedules (kPartialSchedules): [splits, m, n] fp32
  int m = 0, n = 0, k = 0;       // n % 128 == 0, k % 64 == 0 (no padding on this path)
  int group_size = 0;            // >= 64, or k for per-channel
  int splits = 0;                // partial-sum configurations: s >= 2 K-slices; 0 for the others
  bool early = false;            // launch early behind the previous kernel (early_launch.h)
  cudaStream_t stream = nullptr;
};

// The configurations, one per value of the op's `schedule`: hopper_schedules.cuh lists them and says what each is
// for; each is built once per dtype (and variant) in its own translation unit, which setup.py writes.
constexpr int kHopperSchedules = 13;
// The split-K partial-sum schedules as a bit mask (dispatch.PARTIAL_SUM_SCHEDULES); hopper_schedules.cuh checks it
// against the configurations.
constexpr unsigned kPartialSchedules = 1u << 2 | 1u << 3 | 1u << 6 | 1u << 7 | 1u << 8 | 1u << 9 | 1u << 10 | 1u << 12;
// The schedules also built with zero points, for asymmetric layers (dispatch.ZERO_POINT_SCHEDULES): the ones the
// symmetric layers run in each regime of M (256 x 16 / 32 / 64 partials up to 64 rows, 128 x 128 partials and
// data-parallel tiles, 128 x 256 tiles at the largest M), not all thirteen, to bound the build.
constexpr unsigned kZeroPointSchedules = 1u << 0 | 1u << 1 | 1u << 2 | 1u << 6 | 1u << 7 | 1u << 8;
// Whether a schedule mask above holds `schedule`.
constexpr bool in_mask(unsigned mask, int schedule) { return (mask >> schedule) & 1u; }

enum HopperDtype { kFloat16 = 0, kBfloat16 = 1 };

// One configuration's entry points, defined and instantiated in its translation unit (hopper_schedules.cuh); Zeros:
// its build for asymmetric layers (kZeroPointSchedules only). run returns nullptr on success, else a static error
// message; workspace: the bytes its launch needs.
template <int Dtype, int Schedule, bool Zeros>
struct HopperGemm {
  static const char* run(const HopperGemmArgs& args);
  static size_t workspace(const HopperGemmArgs& args);
};

}  // namespace hf_int4
