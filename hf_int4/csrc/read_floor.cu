// Launcher of read_floor_kernel (read_floor.cuh) for torch.ops.hf_int4.read_floor.
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
  read_floor_kernel<<<blocks, kReadFloorThreads, 0, stream>>>(args, key, sink);
  return cudaGetLastError() == cudaSuccess ? nullptr : "hf_int4::read_floor: launch failed";
}

}  // namespace hf_int4
