// fp16, data-parallel 128x192 tiles in clusters of two along the weights (one translation unit each: CUTLASS kernels
// compile slowly).
#include "hopper_gemm_early.cuh"

namespace hf_int4 {
using Gemm_fp16_tile192_cluster = hopper::Cooperative<cutlass::half_t, hopper::DataParallel, 192, cutlass::half_t, 2>;
const char* hopper_gemm_fp16_tile192_cluster(const HopperGemmArgs& args) { return Gemm_fp16_tile192_cluster::run(args); }
size_t hopper_gemm_workspace_fp16_tile192_cluster(const HopperGemmArgs& args) { return Gemm_fp16_tile192_cluster::workspace(args); }
}  // namespace hf_int4
