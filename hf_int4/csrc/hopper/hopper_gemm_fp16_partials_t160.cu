// fp16, split-K into fp32 partials with 128x160 tiles of the Hopper int4 GEMM (one translation unit each: CUTLASS kernels compile
// slowly).
#include "hopper_gemm_early.cuh"

namespace hf_int4 {
using Gemm_fp16_partials_t160 = hopper::Cooperative<cutlass::half_t, hopper::DataParallel, 160, float>;
const char* hopper_gemm_fp16_partials_t160(const HopperGemmArgs& args) { return Gemm_fp16_partials_t160::run(args); }
size_t hopper_gemm_workspace_fp16_partials_t160(const HopperGemmArgs& args) { return Gemm_fp16_partials_t160::workspace(args); }
}  // namespace hf_int4
