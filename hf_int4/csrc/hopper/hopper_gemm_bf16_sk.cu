// bf16, stream-K schedule of the Hopper int4 GEMM (one translation unit each: CUTLASS kernels compile slowly).
#include "hopper_gemm.cuh"

namespace hf_int4 {
using Gemm_bf16_sk = hopper::Cooperative<cutlass::bfloat16_t, hopper::StreamK>;
const char* hopper_gemm_bf16_sk(const HopperGemmArgs& args) { return Gemm_bf16_sk::run(args); }
size_t hopper_gemm_workspace_bf16_sk(const HopperGemmArgs& args) { return Gemm_bf16_sk::workspace(args); }
}  // namespace hf_int4
