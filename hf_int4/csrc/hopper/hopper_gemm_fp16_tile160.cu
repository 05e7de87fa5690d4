// fp16, data-parallel 128x160 tiles of the Hopper int4 GEMM (one translation unit each: CUTLASS kernels compile
// slowly).
#include "hopper_gemm_early.cuh"

namespace hf_int4 {
using Gemm_fp16_tile160 = hopper::Cooperative<cutlass::half_t, hopper::DataParallel, 160>;
const char* hopper_gemm_fp16_tile160(const HopperGemmArgs& args) { return Gemm_fp16_tile160::run(args); }
size_t hopper_gemm_workspace_fp16_tile160(const HopperGemmArgs& args) { return Gemm_fp16_tile160::workspace(args); }
}  // namespace hf_int4
