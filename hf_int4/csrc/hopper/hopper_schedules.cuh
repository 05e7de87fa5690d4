// The Hopper int4 GEMM's configurations, one per schedule (the op's `schedule` indexes this list), and the build of
// one of them. CUTLASS kernels compile slowly, so each configuration is built per dtype in a translation unit of its
// own, in parallel: setup.py writes one small .cu per dtype, schedule and variant that defines HF_INT4_HOPPER_DTYPE
// (HopperDtype), HF_INT4_HOPPER_SCHEDULE and HF_INT4_HOPPER_ZEROS (0 symmetric, 1 with zero points) and includes it.
#pragma once

#include "hopper_gemm.h"

#if !defined(HF_INT4_HOPPER_DTYPE) || !defined(HF_INT4_HOPPER_SCHEDULE) || !defined(HF_INT4_HOPPER_ZEROS)
#error "define HF_INT4_HOPPER_DTYPE, _SCHEDULE and _ZEROS (setup.py writes the translation units that do)"
#endif

// Launch early: CUTLASS's grid dependency control must be compiled in before any CUTLASS header. (CUTLASS 4.2's
// stream-K scheduler does not compile with it; no configuration here uses that scheduler.)
#define CUTLASS_ENABLE_GDC_FOR_SM90
#include <tuple>

#include "hopper_gemm.cuh"

namespace hf_int4 {
namespace hopper {

// Tiles are weight rows x tokens (x 64 k), persistent data-parallel; Cooperative's defaults: 128 x 128, output in the
// activation dtype.
// Partials (Out = float): split-K, every K-slice at once writing fp32 partials that a second kernel sums.
template <class Act>
using Schedules = std::tuple<
    // 0: 128 x 128 tiles
    Cooperative<Act>,
    // 1: 128 x 256 tiles, which convert each int4 weight once per 256 tokens instead of 128
    Cooperative<Act, 256>,
    // 2, 3: split-K partials with 128 x 128 and 128 x 64 tiles
    Cooperative<Act, 128, float>,
    Cooperative<Act, 64, float>,
    // 4: 128 x 192 tiles: at M = 192 j no padding rows, and a wave count between the 128- and 256-token tiles'
    Cooperative<Act, 192>,
    // 5: the 128 x 256 tiles of 1 in clusters of two CTAs along the weights that share the activation tiles (TMA
    // multicast)
    Cooperative<Act, 256, Act, 2>,
    // 6, 7, 8: split-K partials with 256 (weights) x 64, 256 x 32 and 256 x 16 (tokens) tiles. At M <= 64 the
    // mainloop is bound by the latency of each k-block's smem -> convert -> wgmma chain, not by the tensor cores: 256
    // weight rows (128 per warpgroup) carry twice the weights per chain of 128-row tiles (H200, M = 16-32: 1.06-1.47x
    // faster than the best 128-row configuration, docs/results/bench_hopper_w256_h200.txt)
    Cooperative<Act, 64, float, 1, 256>,
    Cooperative<Act, 32, float, 1, 256>,
    Cooperative<Act, 16, float, 1, 256>,
    // 9, 10: split-K partials with 128 x 192 and 128 x 256 tiles: at M = 160..1280 these keep the tensor pipe busiest
    // (ncu, H200: 90% at 192 tokens, 76% at 128) and cover M in one or two passes, as long as the layer still has
    // enough CTAs (hence the K-slices)
    Cooperative<Act, 192, float>,
    Cooperative<Act, 256, float>,
    // 11: 128 x 160 tiles, 12: split-K partials with them: M = 160 j runs without padding rows (192-token tiles run
    // 640 tokens as 768), issued as m64n160k16 wgmmas (CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED, hopper_gemm.cuh)
    Cooperative<Act, 160>,
    Cooperative<Act, 160, float>>;
// (CUTLASS's stream-K scheduler, on 128 x 128 and 128 x 64 tiles, was measured here too until 2026-12-07: no layer's
// fastest path at any M on the H100, two points within 2.5% on the H200; dropped to shorten the build.)

static_assert(std::tuple_size_v<Schedules<cutlass::half_t>> == kHopperSchedules,
              "hopper_gemm.h's kHopperSchedules counts the configurations listed here");

// A configuration's build for asymmetric layers (zero points), which only the schedules in kZeroPointSchedules have.
template <class Symmetric>
struct WithZeros;
template <class Act, class TileShape, class ClusterShape, class KernelSchedule, class EpilogueSchedule, class Out>
struct WithZeros<Config<Act, TileShape, ClusterShape, KernelSchedule, EpilogueSchedule, Out, false>> {
  using type = Config<Act, TileShape, ClusterShape, KernelSchedule, EpilogueSchedule, Out, true>;
};

template <int Dtype>
using ActOf = std::conditional_t<Dtype == kFloat16, cutlass::half_t, cutlass::bfloat16_t>;
template <int Dtype, int Schedule>
using SymmetricConfig = std::tuple_element_t<Schedule, Schedules<ActOf<Dtype>>>;
template <int Dtype, int Schedule, bool Zeros>
using ScheduleConfig = std::conditional_t<Zeros, typename WithZeros<SymmetricConfig<Dtype, Schedule>>::type,
                                          SymmetricConfig<Dtype, Schedule>>;

}  // namespace hopper

template <int Dtype, int Schedule, bool Zeros>
const char* HopperGemm<Dtype, Schedule, Zeros>::run(const HopperGemmArgs& args) {
  using Gemm = hopper::ScheduleConfig<Dtype, Schedule, Zeros>;
  static_assert(!Zeros || in_mask(kZeroPointSchedules, Schedule), "kZeroPointSchedules lists the zero-point builds");
  static_assert(Gemm::kPartials == in_mask(kPartialSchedules, Schedule),
                "kPartialSchedules must list exactly the configurations that write fp32 partials");
  return Gemm::run(args);
}

template <int Dtype, int Schedule, bool Zeros>
size_t HopperGemm<Dtype, Schedule, Zeros>::workspace(const HopperGemmArgs& args) {
  return hopper::ScheduleConfig<Dtype, Schedule, Zeros>::workspace(args);
}

template struct HopperGemm<HF_INT4_HOPPER_DTYPE, HF_INT4_HOPPER_SCHEDULE, bool(HF_INT4_HOPPER_ZEROS)>;

}  // namespace hf_int4
