// CUTLASS's mixed-input mainloop (sm90_mma_tma_gmma_rs_warpspecialized_mixed_input.hpp, CUTLASS 4.2) with one
// change of schedule: each warpgroup converts a whole k-tile of int4 weights (all its k16 blocks) into one of two
// register sets, then issues that k-tile's wgmmas behind a single fence, while the other set feeds the k-tile before.
//
// Why: CUTLASS converts one k16 block at a time and fences (wgmma.fence) before each block's wgmma; its
// all-shared-memory mainloop fences once per k-tile. On the H200 (docs/kernel_notes.md step 29) this makes tiles of
// 16..64 tokens 3-5% faster and leaves wider ones within 1%: the fences were a small part of what a k-tile costs.
//
// Zero points (asymmetric layers) are applied as GPTQ defines them, w = (q - z) s, from the zeros every kernel reads
// (magic + z, kernels.h); CUTLASS's zero mode computes q s + z' and would need a second, pre-scaled copy of them.
#pragma once

#include <type_traits>

#include "../gemm_common.cuh"  // gemm::Act: the zeros' magic numbers
#include "cutlass/gemm/collective/collective_builder.hpp"

namespace hf_int4 {
namespace hopper {

template <class Base>
struct TileBatchedMainloop : Base {
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::Params;
  using typename Base::TensorStorage;
  using typename Base::TiledMma;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::SwappedSmemCopyAtomA;
  using typename Base::SwappedStrideA;
  using typename Base::RealSwappedElementA;
  using Utils = cutlass::gemm::collective::detail::MixedInputUtils<Base>;  // Base befriends MixedInputUtils
  static constexpr bool kZeros = Base::KernelConversionMode == cutlass::detail::ConversionMode::ConvertAndScaleWithZero;

  // k-block k_block of the copied int4 weights `load` into `a`, in the activation dtype. With zeros: the converter
  // gives q - 8 and a zero is magic + z, so q - z = (q - 8) - (zero - (magic + 8)), exact in fp16 and bf16 (|q - z| <=
  // 15); times the scale it is rounded once, as in the decode kernels.
  template <class Load, class Converted, class ExtraInfo>
  CUTLASS_DEVICE static void dequantize_k_block(Load const& load, Converted& a, ExtraInfo& extra_info, int k_block) {
    using namespace cute;
    if constexpr (kZeros) {
      using Act = typename Base::ElementScale;
      using Native = std::conditional_t<std::is_same_v<Act, cutlass::half_t>, __half, __nv_bfloat16>;
      const Act magic_plus_8 = Act::bitcast(static_cast<uint16_t>(gemm::Act<Native>::kSymZero2));  // low half
      Tensor src = load(_, _, k_block);
      Tensor dst = a(_, _, k_block);
      constexpr int kPerRegister = cute::min(decltype(size(src(_, 0)))::value, 8);  // int4 values in 32 bits
      Tensor src_vm = group_modes<1, -1>(zipped_divide(src, Int<kPerRegister>{}));
      Tensor dst_vm = group_modes<1, -1>(zipped_divide(dst, Int<kPerRegister>{}));
      Tensor scales_vm = group_modes<1, -1>(zipped_divide(get<1>(extra_info)(_, _, k_block), Int<kPerRegister>{}));
      Tensor zeros_vm = group_modes<1, -1>(zipped_divide(get<3>(extra_info)(_, _, k_block), Int<kPerRegister>{}));
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size<1>(dst_vm); ++i) {
        cutlass::LayoutAwareConvert(src_vm(_, i), dst_vm(_, i));
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < size<0>(dst_vm); ++j)
          dst_vm(j, i) = (dst_vm(j, i) - (zeros_vm(j, i) - magic_plus_8)) * scales_vm(j, i);
      }
    } else {
      Utils::dequantize_A_kblock(load, a, extra_info, k_block);
    }
  }

  template <class FrgTensorC>
  CUTLASS_DEVICE void mma(MainloopPipeline pipeline, PipelineState smem_pipe_read, FrgTensorC& accum, int k_tile_count,
                          int thread_idx, TensorStorage& shared_tensors, Params const& mainloop_params) {
    using namespace cute;
    constexpr int kThreadsPerWarpGroup = cutlass::NumThreadsPerWarpGroup;
    const int warp_group_thread_idx = thread_idx % kThreadsPerWarpGroup;

    Tensor sA = as_position_independent_swizzle_tensor(
        make_tensor(make_smem_ptr(shared_tensors.smem_A.begin()), SmemLayoutA{}));  // (BLK_M, BLK_K, PIPE)
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.begin()), SmemLayoutB{});  // (BLK_N, BLK_K, PIPE)

    constexpr int kMmaWarpGroups = size(TiledMma{}) / kThreadsPerWarpGroup;
    Layout warp_group_thread_layout = make_layout(Int<kMmaWarpGroups>{}, Int<kThreadsPerWarpGroup>{});
    const int warp_group_idx = __shfl_sync(0xFFFFFFFF, thread_idx / kThreadsPerWarpGroup, 0);

    TiledMma tiled_mma;
    auto mma_thread_slice = tiled_mma.get_thread_slice(thread_idx);
    Tensor tCsA = mma_thread_slice.partition_A(sA);
    auto mma_warpgroup_slice = tiled_mma.get_slice(warp_group_thread_layout(warp_group_idx));
    // Two register sets of converted weights, each a whole k-tile: (MMA, MMA_M, MMA_K)
    Tensor tCrA_even = mma_thread_slice.partition_fragment_A(sA(_, _, Int<0>{}));
    Tensor tCrA_odd = make_fragment_like(tCrA_even);
    Tensor tCrA_load = [&] {
      if constexpr (not is_layout<SwappedStrideA>::value) return make_fragment_like<RealSwappedElementA>(tCrA_even);
      else return make_tensor_like<RealSwappedElementA>(tCsA(_, _, _, Int<0>{}));
    }();
    Tensor tCsB = mma_warpgroup_slice.partition_B(sB);  // (MMA, MMA_N, MMA_K, PIPE)
    Tensor tCrB = mma_warpgroup_slice.make_fragment_B(tCsB);
    auto smem_tiled_copy_A = make_tiled_copy_A(SwappedSmemCopyAtomA{}, tiled_mma);
    Tensor tCrA_copy_view = smem_tiled_copy_A.get_thread_slice(warp_group_thread_idx).retile_D(tCrA_load);
    auto partitioned_extra_info = Utils::partition_extra_mma_info(mma_thread_slice, shared_tensors);
    auto copy_partitions_extra_info = Utils::retile_extra_mma_info(tiled_mma, partitioned_extra_info, warp_group_thread_idx);
    constexpr int K_BLOCK_MAX = size<2>(tCrA_load);

    // One k-tile: wait for its stage, copy its int4 weights (and, with the first block, its scales) from shared
    // memory and convert them into `a`, then its wgmmas behind one fence. Two lambdas, the wgmmas' taking `a` as
    // const: written as one, nvcc repacks the converted halves before the wgmmas (~33 PRMT and ~30 SHF more per two
    // k-tiles of a 128 x 160 tile, which ran 5% slower on the H200; docs/kernel_notes.md step 30).
    auto load_k_tile = [&](auto& a) {
      pipeline.consumer_wait(smem_pipe_read, pipeline.consumer_try_wait(smem_pipe_read));
      const int stage = smem_pipe_read.index();
      ++smem_pipe_read;
      CUTLASS_PRAGMA_UNROLL
      for (int k_block = 0; k_block < K_BLOCK_MAX; ++k_block)
        Utils::copy_tensors_MK(smem_tiled_copy_A, tCsA, tCrA_copy_view, partitioned_extra_info,
                               copy_partitions_extra_info, k_block, stage);
      CUTLASS_PRAGMA_UNROLL
      for (int k_block = 0; k_block < K_BLOCK_MAX; ++k_block)
        dequantize_k_block(tCrA_load, a, partitioned_extra_info, k_block);
      return stage;
    };
    auto mma_k_tile = [&](auto const& a, int stage) {
      warpgroup_fence_operand(accum);
      warpgroup_arrive();
      CUTLASS_PRAGMA_UNROLL
      for (int k_block = 0; k_block < K_BLOCK_MAX; ++k_block) {
        cute::gemm(tiled_mma, a(_, _, k_block), tCrB(_, _, k_block, stage), accum);
        tiled_mma.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
      warpgroup_fence_operand(accum);
    };
    auto run_k_tile = [&](auto& a) { mma_k_tile(a, load_k_tile(a)); };
    // After each k-tile but the first: the k-tile before it is done, so its stage goes back to the producer and its
    // register set may take the next k-tile. (mma_tail releases the last k-tile's stage.)
    PipelineState smem_pipe_release = smem_pipe_read;
    auto release_previous = [&] {
      warpgroup_wait<1>();
      pipeline.consumer_release(smem_pipe_release);
      ++smem_pipe_release;
    };

    tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
    run_k_tile(tCrA_even);
    CUTLASS_PRAGMA_NO_UNROLL
    for (--k_tile_count; k_tile_count >= 2; k_tile_count -= 2) {
      run_k_tile(tCrA_odd);
      release_previous();
      run_k_tile(tCrA_even);
      release_previous();
    }
    if (k_tile_count == 1) {
      run_k_tile(tCrA_odd);
      release_previous();
    }
  }
};

}  // namespace hopper
}  // namespace hf_int4
