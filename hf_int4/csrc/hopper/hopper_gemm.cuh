// int4 x fp16/bf16 GEMM for Hopper on CUTLASS's mixed-input collective (TMA loads, warp-specialised
// cooperative schedule, int4 converted in registers and fed to wgmma as the A operand), its consumer loop
// rescheduled to convert a whole k-tile per fence (tile_batched_mainloop.cuh).
//
// The problem is run transposed ("swap AB"): C^T [n, m] = W^T [n, k] x A^T, so that the int4 weight is
// wgmma's register operand; C^T column-major is C [m, n] row-major, written by the TMA epilogue, which
// also adds the bias (per row of C^T). Weights are signed int4 (q - 8) times a group scale (symmetric GPTQ), or, in the
// configurations built with zeros, (q - z) times the scale (asymmetric; tile_batched_mainloop.cuh).
#pragma once

// wgmma shapes of every width that is a multiple of 8 (CuTe offers n = 160 only with this): 160-token tiles run as
// m64n160k16, not five m64n32k16 (docs/kernel_notes.md step 30). Widths CuTe always offers are chosen as before.
#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

#include <type_traits>

#include "../gemm_common.cuh"  // grid_dependency_wait, launch_dependents, launch_maybe_early
#include "hopper_gemm.h"
#include "tile_batched_mainloop.cuh"
#include "cutlass/util/mixed_dtype_utils.hpp"  // compute_memory_reordering_atom

namespace hf_int4 {
namespace hopper {

using namespace cute;

// A kernel launched early must wait for the one before it, which CUTLASS's kernels do when built with
// CUTLASS_ENABLE_GDC_FOR_SM90 (hopper_schedules.cuh defines it before any CUTLASS header).
#ifndef CUTLASS_ENABLE_GDC_FOR_SM90
#error "define CUTLASS_ENABLE_GDC_FOR_SM90 before including CUTLASS: the kernels launch early"
#endif

// out [m, n] = sum over the splits of partials [splits, m, n] (+ bias), in split order. Launched early (while the
// GEMM that writes the partials finishes), it waits for that GEMM before reading them.
template <class Act>
__global__ void reduce_partials_kernel(const float4* __restrict__ partials, const Act* __restrict__ bias,
                                       Act* __restrict__ out, int64_t quads, int n, int splits) {
  gemm::grid_dependency_wait();
  gemm::launch_dependents();
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= quads) return;
  float4 v = partials[i];
  for (int s = 1; s < splits; ++s) {
    const float4 p = partials[i + s * quads];
    v.x += p.x, v.y += p.y, v.z += p.z, v.w += p.w;
  }
  using Quad = cutlass::AlignedArray<Act, 4>;  // one 8-byte load / store
  if (bias != nullptr) {
    const Quad b = *reinterpret_cast<const Quad*>(bias + (4 * i) % n);
    v.x += float(b[0]), v.y += float(b[1]), v.z += float(b[2]), v.w += float(b[3]);
  }
  Quad o;
  o[0] = Act(v.x), o[1] = Act(v.y), o[2] = Act(v.z), o[3] = Act(v.w);
  *reinterpret_cast<Quad*>(out + 4 * i) = o;
}

template <class Act>
const char* reduce_partials(const HopperGemmArgs& a) {
  const int64_t quads = int64_t(a.m) * a.n / 4;  // n % 128 == 0
  constexpr int kThreads = 256;
  const cudaError_t err = gemm::launch_maybe_early(
      reduce_partials_kernel<Act>, dim3(static_cast<unsigned>((quads + kThreads - 1) / kThreads)), dim3(kThreads), 0,
      a.stream, a.early, reinterpret_cast<const float4*>(a.partials), static_cast<const Act*>(a.bias),
      static_cast<Act*>(a.c), quads, a.n, a.splits);
  return err == cudaSuccess ? nullptr : "hf_int4::hopper_int4_gemm: launching the split-K sum failed";
}

// Out = Act: C = A W (+ bias). Out = float: split-K partials, HopperGemmArgs::splits K-slices run as a batch
// (L = splits) that writes fp32 partials [splits, m, n] to HopperGemmArgs::partials, summed afterwards by
// reduce_partials: every slice runs at once and no CTA waits for another (CUTLASS's own split-K reduces the
// partial tiles one CTA after the other). Zeros: asymmetric layers, HopperGemmArgs::zeros read beside the scales
// (symmetric layers run the configurations without, which load no zeros).
template <class Act, class TileShape, class ClusterShape, class KernelSchedule, class EpilogueSchedule,
          class Out = Act, bool Zeros = false>
struct Config {
  static constexpr bool kPartials = std::is_same_v<Out, float>;
  static constexpr int kOutAlign = 16 / sizeof(Out);
  using Quant = cutlass::int4b_t;
  // CUTLASS's element tuple: the quantized type, its scale type and, in zero mode, its zero type
  using QuantTuple = std::conditional_t<Zeros, cute::tuple<Quant, Act, Act>, cute::tuple<Quant, Act>>;
  using Accumulator = float;
  // The packed layout (kernels.h): one reordering atom (16 x 16), values shuffled [0,2,4,6,1,3,5,7].
  using ValueShuffle = Layout<Shape<_2, _4>, Stride<_4, _1>>;
  using AtomQuant = decltype(cutlass::compute_memory_reordering_atom<Act, Layout<Shape<_1, _1>>, ValueShuffle>());
  using StrideAct = Stride<int64_t, _1, int64_t>;  // activations [m, k], K-major
  using LayoutQuant = decltype(tile_to_shape(AtomQuant{}, Layout<Shape<int, int, int>, StrideAct>{}));
  using LayoutOutT = cutlass::layout::ColumnMajor;  // C^T [n, m] column-major == C [m, n] row-major

  using Fusion = std::conditional_t<kPartials, cutlass::epilogue::fusion::LinearCombination<float, float, float, float>,
                                    cutlass::epilogue::fusion::LinCombPerRowBias<Act, float, Act, Act, float>>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, Accumulator, float, void, LayoutOutT, kOutAlign, Out, LayoutOutT,
      kOutAlign, EpilogueSchedule, Fusion>::CollectiveOp;
  using Mainloop = TileBatchedMainloop<typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, QuantTuple, LayoutQuant, 32, Act,
      cutlass::layout::ColumnMajor, 8, Accumulator, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp>;
  // void: CUTLASS's persistent data-parallel tile scheduler
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue, void>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments arguments(const HopperGemmArgs& a) {
    using StrideScale = typename Mainloop::StrideScale;
    using StrideOut = typename Kernel::StrideD;
    // Partials: batch l is the K-slice [l k_s, (l + 1) k_s). In the packed weight and the scales the slices lie
    // one after the other, so their batched layouts are the unbatched ones; the activations step k_s columns.
    const int slices = kPartials ? a.splits : 1, k_s = a.k / slices;  // partials: groups never straddle slices
    const auto layout_b = tile_to_shape(AtomQuant{}, make_shape(a.n, k_s, slices));
    const StrideAct stride_a{int64_t(a.k), _1{}, int64_t(k_s)};
    const auto stride_s =
        cutlass::make_cute_packed_stride(StrideScale{}, make_shape(a.n, (k_s + a.group_size - 1) / a.group_size, slices));
    const auto stride_c = cutlass::make_cute_packed_stride(StrideOut{}, make_shape(a.n, a.m, slices));
    Out* out = kPartials ? static_cast<Out*>(static_cast<void*>(a.partials)) : static_cast<Out*>(a.c);
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {a.n, a.m, k_s, slices},
        {static_cast<const Quant*>(a.b), layout_b, static_cast<const Act*>(a.a), stride_a,
         static_cast<const Act*>(a.scales), stride_s, a.group_size,
         static_cast<typename Mainloop::ElementZero const*>(Zeros ? a.zeros : nullptr)},
        {{}, nullptr, stride_c, out, stride_c}};
    args.epilogue.thread.alpha = 1.f;
    args.epilogue.thread.beta = 0.f;
    if constexpr (!kPartials) args.epilogue.thread.bias_ptr = static_cast<const Act*>(a.bias);
    return args;
  }

  static size_t workspace(const HopperGemmArgs& a) { return Gemm::get_workspace_size(arguments(a)); }

  static const char* run(const HopperGemmArgs& a) {
    Gemm gemm;
    auto args = arguments(a);
    if (gemm.can_implement(args) != cutlass::Status::kSuccess)
      return "hf_int4::hopper_int4_gemm: CUTLASS cannot run this problem (shape, alignment or group size)";
    if (gemm.initialize(args, a.workspace, a.stream) != cutlass::Status::kSuccess)
      return "hf_int4::hopper_int4_gemm: CUTLASS kernel initialisation failed";
    // early: the kernel's prologue overlaps the previous kernel's tail, its loads wait for that kernel, and its last
    // tile lets the next kernel launch early
    if (gemm.run(a.stream, nullptr, a.early) != cutlass::Status::kSuccess)
      return "hf_int4::hopper_int4_gemm: CUTLASS launch failed";
    if constexpr (kPartials) return reduce_partials<Act>(a);
    return nullptr;
  }
};

// Cooperative schedule, 128 weight rows x TokenTile tokens x 64 k per tile (CUTLASS's stock mixed-input
// configuration at TokenTile = 128), with the persistent data-parallel scheduler. ClusterWeights = 2:
// clusters of two CTAs on neighbouring weight tiles, which share each activation tile by TMA multicast (half the
// activation traffic from L2 per CTA; activations are 8x the int4 weight bytes of a 128 x 256 tile).
// WeightTile = 256: each consumer warpgroup on 128 weight rows (hopper_schedules.cuh, schedules 6, 7 and 8).
template <class Act, int TokenTile = 128, class Out = Act, int ClusterWeights = 1, int WeightTile = 128>
using Cooperative = Config<Act, Shape<Int<WeightTile>, Int<TokenTile>, _64>, Shape<Int<ClusterWeights>, _1, _1>,
                           cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                           cutlass::epilogue::TmaWarpSpecializedCooperative, Out>;

}  // namespace hopper
}  // namespace hf_int4
