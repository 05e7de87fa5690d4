// torch.ops.hf_int4.hopper_int4_gemm: the Hopper large-batch kernel (a separate extension, hf_int4._hopper,
// built only for sm_90a and only where the CUTLASS headers are found). Fake impl: hf_int4/ops.py.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <utility>

#include "../early_launch.h"
#include "../op_checks.h"
#include "hopper_gemm.h"

namespace hf_int4 {
namespace {

// Every configuration's entry points by dtype, variant (without, with zero points) and schedule, each defined in its
// own translation unit; empty where a schedule has no zero-point build (kZeroPointSchedules).
struct HopperKernel {
  const char* (*run)(const HopperGemmArgs&) = nullptr;
  size_t (*workspace)(const HopperGemmArgs&) = nullptr;
};
template <int Dtype, bool Zeros, int Schedule>
constexpr HopperKernel kernel_of() {
  if constexpr (Zeros && !in_mask(kZeroPointSchedules, Schedule)) return {};
  else return {&HopperGemm<Dtype, Schedule, Zeros>::run, &HopperGemm<Dtype, Schedule, Zeros>::workspace};
}
template <int Dtype, bool Zeros, int... Schedule>
constexpr std::array<HopperKernel, kHopperSchedules> kernels_of(std::integer_sequence<int, Schedule...>) {
  return {kernel_of<Dtype, Zeros, Schedule>()...};
}
constexpr auto kSchedules = std::make_integer_sequence<int, kHopperSchedules>{};
constexpr std::array<HopperKernel, kHopperSchedules> kKernels[2][2] = {
    {kernels_of<kFloat16, false>(kSchedules), kernels_of<kFloat16, true>(kSchedules)},
    {kernels_of<kBfloat16, false>(kSchedules), kernels_of<kBfloat16, true>(kSchedules)}};

at::Tensor hopper_int4_gemm_cuda(const at::Tensor& a_in, const at::Tensor& b_packed, const at::Tensor& scales,
                                 const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                                 int64_t size_n, int64_t size_k, int64_t group_size, int64_t schedule, int64_t splits) {
  const char* op = "hf_int4::hopper_int4_gemm";
  TORCH_CHECK(a_in.is_cuda(), op, ": the activation must be a CUDA tensor, got device ", a_in.device());
  TORCH_CHECK(a_in.scalar_type() == at::kHalf || a_in.scalar_type() == at::kBFloat16, op,
              ": the activation must be float16 or bfloat16, got ", a_in.scalar_type());
  TORCH_CHECK(size_n % 128 == 0 && size_k % 64 == 0 && size_n > 0 && size_k > 0, op,
              ": needs out_features % 128 == 0 and in_features % 64 == 0 (no padding on this path), got N=", size_n,
              " K=", size_k);
  TORCH_CHECK(group_size == -1 || group_size % 64 == 0, op,
              ": group_size must be -1 or a multiple of 64 (the tile's K), got ", group_size);
  check_packed_weight(op, a_in, "the activation", b_packed, scales, zeros, size_n, size_k, group_size);
  const at::Tensor bias_c = checked_bias(op, bias, a_in, size_n);
  TORCH_CHECK(schedule >= 0 && schedule < kHopperSchedules, op, ": schedule must be 0..", kHopperSchedules - 1,
              " (the configurations of hf_int4/csrc/hopper/hopper_schedules.cuh), got ", schedule);
  if (zeros.has_value() && !in_mask(kZeroPointSchedules, schedule)) {
    std::string built;
    for (int s = 0; s < kHopperSchedules; ++s)
      if (in_mask(kZeroPointSchedules, s)) built += (built.empty() ? "" : ", ") + std::to_string(s);
    TORCH_CHECK(false, op, ": schedule ", schedule, " has no build with zero points (asymmetric layers run schedules ",
                built, ")");
  }
  const bool partials = in_mask(kPartialSchedules, schedule);  // dispatch.PARTIAL_SUM_SCHEDULES
  TORCH_CHECK(splits == 0 || partials, op, ": splits apply to the split-K partial-sum schedules only, got splits=",
              splits, " with schedule ", schedule);
  TORCH_CHECK(!partials || (splits >= 2 && splits <= 16 && group_size != -1 && size_k % (64 * splits) == 0 &&
                            (size_k / splits) % group_size == 0),
              op, ": the split-K partial-sum schedules need 2..16 splits that cut K into slices of whole 64-row tiles and "
              "whole groups (not per channel), got splits=", splits, " for K=", size_k, ", group size ", group_size);
  const ActivationRows rows = activation_rows(op, a_in, size_k, size_n);
  const at::Tensor& a = rows.a;
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor c = at::empty({a.size(0), size_n}, a.options());
  if (a.size(0) == 0) return c.view(rows.out_shape);
  TORCH_CHECK(a.size(0) <= INT32_MAX, op, ": too many rows");

  HopperGemmArgs args;
  args.a = a.data_ptr();
  args.b = b_packed.data_ptr();
  args.scales = scales.data_ptr();
  args.zeros = zeros.has_value() ? zeros->data_ptr() : nullptr;
  args.bias = bias_c.defined() ? bias_c.data_ptr() : nullptr;
  args.c = c.data_ptr();
  args.m = static_cast<int>(a.size(0));
  args.n = static_cast<int>(size_n);
  args.k = static_cast<int>(size_k);
  args.group_size = static_cast<int>(group_size == -1 ? size_k : group_size);
  args.splits = static_cast<int>(splits);
  args.early = early_launch_enabled();
  args.stream = c10::cuda::getCurrentCUDAStream(a.device().index()).stream();
  const HopperKernel& kernel =
      kKernels[a.scalar_type() == at::kHalf ? kFloat16 : kBfloat16][zeros.has_value() ? 1 : 0][schedule];
  // The workspace (tile-scheduler state) comes from torch's caching allocator:
  // the same block call after call, and a graph capture takes it from the graph's pool.
  const size_t ws_bytes = kernel.workspace(args);
  at::Tensor ws;
  if (ws_bytes > 0) {
    ws = at::empty({static_cast<int64_t>(ws_bytes)}, a.options().dtype(at::kByte));
    args.workspace = ws.data_ptr();
  }
  at::Tensor partial_sums;  // from the caching allocator too: a graph capture takes it from the graph's pool
  if (partials) {
    partial_sums = at::empty({splits, a.size(0), size_n}, a.options().dtype(at::kFloat));
    args.partials = partial_sums.data_ptr<float>();
  }
  const char* err = kernel.run(args);
  TORCH_CHECK(err == nullptr, err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return c.view(rows.out_shape);
}

}  // namespace
}  // namespace hf_int4

TORCH_LIBRARY_FRAGMENT(hf_int4, m) {
  m.def("hopper_int4_gemm(Tensor a, Tensor b_packed, Tensor scales, Tensor? zeros, Tensor? bias, int size_n, "
        "int size_k, int group_size, int schedule=0, int splits=0) -> Tensor",
        {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(hf_int4, CUDA, m) { m.impl("hopper_int4_gemm", &hf_int4::hopper_int4_gemm_cuda); }

extern "C" PyObject* PyInit__hopper(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_hopper", "hf_int4's Hopper (sm_90a, CUTLASS) kernel; importing registers it", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
