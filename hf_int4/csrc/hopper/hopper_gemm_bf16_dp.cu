// bf16, data-parallel schedule of the Hopper int4 GEMM (one translation unit each: CUTLASS kernels compile slowly).
#include "hopper_gemm_early.cuh"

namespace hf_int4 {
using Gemm_bf16_dp = hopper::Cooperative<cutlass::bfloat16_t, hopper::DataParallel>;
const char* hopper_gemm_bf16_dp(const HopperGemmArgs& args) { return Gemm_bf16_dp::run(args); }
size_t hopper_gemm_workspace_bf16_dp(const HopperGemmArgs& args) { return Gemm_bf16_dp::workspace(args); }
}  // namespace hf_int4
