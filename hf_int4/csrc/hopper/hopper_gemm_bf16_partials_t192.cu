// bf16, split-K into fp32 partials with 128x192 tiles of the Hopper int4 GEMM (one translation unit each: CUTLASS kernels compile
// slowly).
#include "hopper_gemm_early.cuh"

namespace hf_int4 {
using Gemm_bf16_partials_t192 = hopper::Cooperative<cutlass::bfloat16_t, hopper::DataParallel, 192, float>;
const char* hopper_gemm_bf16_partials_t192(const HopperGemmArgs& args) { return Gemm_bf16_partials_t192::run(args); }
size_t hopper_gemm_workspace_bf16_partials_t192(const HopperGemmArgs& args) { return Gemm_bf16_partials_t192::workspace(args); }
}  // namespace hf_int4
