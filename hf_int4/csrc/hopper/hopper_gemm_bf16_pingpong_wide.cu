// bf16, ping-pong schedule with 64 x 256 tiles of the Hopper int4 GEMM (one translation unit each: CUTLASS kernels
// compile slowly).
#include "hopper_gemm_early.cuh"

namespace hf_int4 {
using Gemm_bf16_pingpong_wide = hopper::PingPong<cutlass::bfloat16_t, 256>;
const char* hopper_gemm_bf16_pingpong_wide(const HopperGemmArgs& args) { return Gemm_bf16_pingpong_wide::run(args); }
size_t hopper_gemm_workspace_bf16_pingpong_wide(const HopperGemmArgs& args) {
  return Gemm_bf16_pingpong_wide::workspace(args);
}
}  // namespace hf_int4
