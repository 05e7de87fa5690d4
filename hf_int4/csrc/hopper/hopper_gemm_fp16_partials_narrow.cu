// fp16, split-K into fp32 partials with 128 x 64 tiles of the Hopper int4 GEMM (one translation unit each:
// CUTLASS kernels compile slowly).
#include "hopper_gemm_early.cuh"

namespace hf_int4 {
using Gemm_fp16_partials_narrow = hopper::Cooperative<cutlass::half_t, hopper::DataParallel, 64, float>;
const char* hopper_gemm_fp16_partials_narrow(const HopperGemmArgs& args) { return Gemm_fp16_partials_narrow::run(args); }
size_t hopper_gemm_workspace_fp16_partials_narrow(const HopperGemmArgs& args) { return Gemm_fp16_partials_narrow::workspace(args); }
}  // namespace hf_int4
