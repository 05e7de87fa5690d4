// bf16, data-parallel 128x128 tiles in clusters of two along the weights (one translation unit each: CUTLASS kernels
// compile slowly).
#include "hopper_gemm_early.cuh"

namespace hf_int4 {
using Gemm_bf16_dp_cluster = hopper::Cooperative<cutlass::bfloat16_t, hopper::DataParallel, 128, cutlass::bfloat16_t, 2>;
const char* hopper_gemm_bf16_dp_cluster(const HopperGemmArgs& args) { return Gemm_bf16_dp_cluster::run(args); }
size_t hopper_gemm_workspace_bf16_dp_cluster(const HopperGemmArgs& args) { return Gemm_bf16_dp_cluster::workspace(args); }
}  // namespace hf_int4
