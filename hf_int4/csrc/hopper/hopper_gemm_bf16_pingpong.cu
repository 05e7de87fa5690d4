// bf16, ping-pong schedule with 64 x 128 tiles of the Hopper int4 GEMM (one translation unit each: CUTLASS kernels
// compile slowly).
#include "hopper_gemm_early.cuh"

namespace hf_int4 {
using Gemm_bf16_pingpong = hopper::PingPong<cutlass::bfloat16_t>;
const char* hopper_gemm_bf16_pingpong(const HopperGemmArgs& args) { return Gemm_bf16_pingpong::run(args); }
size_t hopper_gemm_workspace_bf16_pingpong(const HopperGemmArgs& args) { return Gemm_bf16_pingpong::workspace(args); }
}  // namespace hf_int4
