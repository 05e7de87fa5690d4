// Host API of the Hopper large-batch kernel (CUTLASS, TMA + wgmma), shared by hopper_ops.cpp and the
// per-dtype translation units. It reads the packed weight of kernels.h as it is: that layout is
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
  const void* bias = nullptr;    // [n] or nullptr
  void* c = nullptr;             // [m, n]
  void* workspace = nullptr;
  float* partials = nullptr;     // schedules 4, 5: [splits, m, n] fp32
  int m = 0, n = 0, k = 0;       // n % 128 == 0, k % 64 == 0 (no padding on this path)
  int group_size = 0;            // >= 64, or k for per-channel
  int splits = 0;                // stream-K configurations: 0 CUTLASS's heuristic, 1 data-parallel, s > 1 split-K;
                                 // partial-sum configurations: s >= 2 K-slices
  bool early = false;            // launch early behind the previous kernel (early_launch.h)
  cudaStream_t stream = nullptr;
};

// Configurations, each a translation unit per dtype: 0 data-parallel 128x128 tiles (persistent), 1 the same
// tiles with the stream-K scheduler (CUTLASS's heuristic splits K across CTAs when there are too few tiles, or
// `splits` forces split-K), 2 data-parallel 128 (weights) x 256 (tokens) tiles, which convert each int4 weight
// once per 256 tokens instead of 128, 3 128 x 64 tiles with the stream-K scheduler: at M <= 64 a 128-token
// tile would spend half its MMAs on padding rows; 4 and 5: split-K with 128 x 128 and 128 x 64 tiles, every K-slice
// at once writing fp32 partials, then one kernel sums them (hopper_gemm.cuh, Config with Out = float); 6 data-parallel
// 128 x 192 tiles: at M = 192 * j no padding rows, and a wave count between the 128- and 256-token tiles'; 7 the
// 128 x 256 tiles of 2 in clusters of two CTAs along the weights that share the activation tiles (TMA multicast);
// 8, 9 and 10: split-K partials with 256 (weights) x 64, 256 x 32 and 256 x 16 (tokens) tiles. At M <= 64 the
// mainloop is bound by the latency of each k-block's smem -> convert -> wgmma chain, not by the tensor cores: 256
// weight rows (128 per warpgroup) carry twice the weights per chain of 128-row tiles (H200, M = 16-32: 1.06-1.47x
// faster than the best 128-row configuration, docs/results/bench_hopper_w256_h200.txt). 11 and 12: split-K partials
// with 128 x 192 and 128 x 256 tiles: at M = 160..1280 these keep the tensor pipe busiest (ncu, H200: 90% at 192
// tokens, 76% at 128) and cover M in one or two passes, as long as the layer still has enough CTAs (hence the K-slices).
// 13 data-parallel 128 x 160 tiles, 14 split-K partials with them: M = 160 j runs without padding rows (192-token
// tiles run 640 tokens as 768), issued as m64n160k16 wgmmas (CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED, hopper_gemm.cuh).
constexpr int kHopperSchedules = 15;
// The split-K partial-sum schedules as a bit mask (dispatch.PARTIAL_SUM_SCHEDULES).
constexpr unsigned kPartialSchedules = 1u << 4 | 1u << 5 | 1u << 8 | 1u << 9 | 1u << 10 | 1u << 11 | 1u << 12 | 1u << 14;

// Each returns nullptr on success, else a static error message; *_workspace: bytes the launch needs.
#define HF_INT4_HOPPER_DECLARE(dtype, schedule)                                     \
  const char* hopper_gemm_##dtype##_##schedule(const HopperGemmArgs& args);        \
  size_t hopper_gemm_workspace_##dtype##_##schedule(const HopperGemmArgs& args);
HF_INT4_HOPPER_DECLARE(fp16, dp)
HF_INT4_HOPPER_DECLARE(fp16, sk)
HF_INT4_HOPPER_DECLARE(bf16, dp)
HF_INT4_HOPPER_DECLARE(bf16, sk)
HF_INT4_HOPPER_DECLARE(fp16, wide)
HF_INT4_HOPPER_DECLARE(bf16, wide)
HF_INT4_HOPPER_DECLARE(fp16, narrow)
HF_INT4_HOPPER_DECLARE(bf16, narrow)
HF_INT4_HOPPER_DECLARE(fp16, partials)
HF_INT4_HOPPER_DECLARE(bf16, partials)
HF_INT4_HOPPER_DECLARE(fp16, partials_narrow)
HF_INT4_HOPPER_DECLARE(bf16, partials_narrow)
HF_INT4_HOPPER_DECLARE(fp16, tile192)
HF_INT4_HOPPER_DECLARE(bf16, tile192)
HF_INT4_HOPPER_DECLARE(fp16, wide_cluster)
HF_INT4_HOPPER_DECLARE(bf16, wide_cluster)
HF_INT4_HOPPER_DECLARE(fp16, partials_w256)
HF_INT4_HOPPER_DECLARE(bf16, partials_w256)
HF_INT4_HOPPER_DECLARE(fp16, partials_w256_t32)
HF_INT4_HOPPER_DECLARE(bf16, partials_w256_t32)
HF_INT4_HOPPER_DECLARE(fp16, partials_w256_t16)
HF_INT4_HOPPER_DECLARE(bf16, partials_w256_t16)
HF_INT4_HOPPER_DECLARE(fp16, partials_t192)
HF_INT4_HOPPER_DECLARE(bf16, partials_t192)
HF_INT4_HOPPER_DECLARE(fp16, partials_wide)
HF_INT4_HOPPER_DECLARE(bf16, partials_wide)
HF_INT4_HOPPER_DECLARE(fp16, tile160)
HF_INT4_HOPPER_DECLARE(bf16, tile160)
HF_INT4_HOPPER_DECLARE(fp16, partials_t160)
HF_INT4_HOPPER_DECLARE(bf16, partials_t160)
#undef HF_INT4_HOPPER_DECLARE

}  // namespace hf_int4
