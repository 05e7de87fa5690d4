// bf16, split-K into fp32 partials with 128 x 128 tiles of the Hopper int4 GEMM (one translation unit each:
// CUTLASS kernels compile slowly).
#include "hopper_gemm_early.cuh"

namespace hf_int4 {
using Gemm_bf16_partials = hopper::Cooperative<cutlass::bfloat16_t, hopper::DataParallel, 128, float>;
const char* hopper_gemm_bf16_partials(const HopperGemmArgs& args) { return Gemm_bf16_partials::run(args); }
size_t hopper_gemm_workspace_bf16_partials(const HopperGemmArgs& args) { return Gemm_bf16_partials::workspace(args); }
}  // namespace hf_int4
