// bf16, 128 (weights) x 64 (tokens) tiles with the stream-K scheduler of the Hopper int4 GEMM (one translation unit each:
// CUTLASS kernels compile slowly).
#include "hopper_gemm.cuh"

namespace hf_int4 {
using Gemm_bf16_narrow = hopper::Cooperative<cutlass::bfloat16_t, hopper::StreamK, 64>;
const char* hopper_gemm_bf16_narrow(const HopperGemmArgs& args) { return Gemm_bf16_narrow::run(args); }
size_t hopper_gemm_workspace_bf16_narrow(const HopperGemmArgs& args) { return Gemm_bf16_narrow::workspace(args); }
}  // namespace hf_int4
