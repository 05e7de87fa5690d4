// bf16, split-K into fp32 partials with 256 (weights) x 16 (tokens) tiles of the Hopper int4 GEMM (one translation
// unit each: CUTLASS kernels compile slowly).
#include "hopper_gemm_early.cuh"

namespace hf_int4 {
using Gemm_bf16_partials_w256_t16 = hopper::Cooperative<cutlass::bfloat16_t, hopper::DataParallel, 16, float, 1, 256>;
const char* hopper_gemm_bf16_partials_w256_t16(const HopperGemmArgs& args) { return Gemm_bf16_partials_w256_t16::run(args); }
size_t hopper_gemm_workspace_bf16_partials_w256_t16(const HopperGemmArgs& args) { return Gemm_bf16_partials_w256_t16::workspace(args); }
}  // namespace hf_int4
