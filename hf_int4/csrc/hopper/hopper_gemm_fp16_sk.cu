// fp16, stream-K schedule of the Hopper int4 GEMM (one translation unit each: CUTLASS kernels compile slowly).
#include "hopper_gemm.cuh"

namespace hf_int4 {
using Gemm_fp16_sk = hopper::Cooperative<cutlass::half_t, hopper::StreamK>;
const char* hopper_gemm_fp16_sk(const HopperGemmArgs& args) { return Gemm_fp16_sk::run(args); }
size_t hopper_gemm_workspace_fp16_sk(const HopperGemmArgs& args) { return Gemm_fp16_sk::workspace(args); }
}  // namespace hf_int4
