// Launcher of read_floor_kernel (read_floor.cuh) for torch.ops.hf_int4.read_floor.
#include "early_launch.h"
#include "kernels.h"
#include "read_floor.cuh"

namespace hf_int4 {

const char* read_floor_launch(const void* const* buffers, const int64_t* bytes, int count, int key, int* sink,
                              int blocks, cudaStream_t stream) {
  ReadFloorArgs args{};
  for (int j = 0; j < count; ++j) {
    args.p[j] = static_cast<const int4*>(buffers[j]);
    args.n[j] = bytes[j] / 16;
  }
  // launched early like the GEMMs (it reads nothing a previous kernel writes, so it never waits)
  const bool ok = gemm::launch_maybe_early(read_floor_kernel, dim3(blocks), dim3(kReadFloorThreads), 0, stream,
                                           early_launch_enabled(), args, key, sink) == cudaSuccess;
  return ok ? nullptr : "hf_int4::read_floor: launch failed";
}

}  // namespace hf_int4
