// fp16, data-parallel 128x192 tiles of the Hopper int4 GEMM (one translation unit each: CUTLASS kernels compile slowly).
#include "hopper_gemm_early.cuh"

namespace hf_int4 {
using Gemm_fp16_tile192 = hopper::Cooperative<cutlass::half_t, hopper::DataParallel, 192>;
const char* hopper_gemm_fp16_tile192(const HopperGemmArgs& args) { return Gemm_fp16_tile192::run(args); }
size_t hopper_gemm_workspace_fp16_tile192(const HopperGemmArgs& args) { return Gemm_fp16_tile192::workspace(args); }
}  // namespace hf_int4
