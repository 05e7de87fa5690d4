// fp16, 128 (weights) x 64 (tokens) tiles with the stream-K scheduler of the Hopper int4 GEMM (one translation unit each:
// CUTLASS kernels compile slowly).
#include "hopper_gemm.cuh"

namespace hf_int4 {
using Gemm_fp16_narrow = hopper::Cooperative<cutlass::half_t, hopper::StreamK, 64>;
const char* hopper_gemm_fp16_narrow(const HopperGemmArgs& args) { return Gemm_fp16_narrow::run(args); }
size_t hopper_gemm_workspace_fp16_narrow(const HopperGemmArgs& args) { return Gemm_fp16_narrow::workspace(args); }
}  // namespace hf_int4
