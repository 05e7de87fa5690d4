// bf16 instantiations of the int4 GEMM (3 tiles x 4 m-blocks = 12 kernels).
#include "decode_gemm.cuh"

namespace hf_int4 {
const char* int4_gemm_bf16(const Int4GemmArgs& args) { return gemm::run_int4_gemm<__nv_bfloat16>(args); }
}  // namespace hf_int4
