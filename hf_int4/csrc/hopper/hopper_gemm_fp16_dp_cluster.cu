// fp16, data-parallel 128x128 tiles in clusters of two along the weights (one translation unit each: CUTLASS kernels
// compile slowly).
#include "hopper_gemm_early.cuh"

namespace hf_int4 {
using Gemm_fp16_dp_cluster = hopper::Cooperative<cutlass::half_t, hopper::DataParallel, 128, cutlass::half_t, 2>;
const char* hopper_gemm_fp16_dp_cluster(const HopperGemmArgs& args) { return Gemm_fp16_dp_cluster::run(args); }
size_t hopper_gemm_workspace_fp16_dp_cluster(const HopperGemmArgs& args) { return Gemm_fp16_dp_cluster::workspace(args); }
}  // namespace hf_int4
