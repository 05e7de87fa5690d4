// Input checks shared by the ops of both extensions (hf_int4._C: ops.cpp, hf_int4._hopper: hopper/hopper_ops.cpp),
// so that every op names the offending tensor and setting the same way.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "kernels.h"

namespace hf_int4 {

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

inline void check_cuda_same_device(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref,
                                   const char* ref_name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
}

inline bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

struct PackedSizes {
  int64_t k_pad, n_pad;
};

// Checks a packed weight (hf_int4.packing's layout) against its logical sizes, and its device / dtype
// against `ref` (the activation, or the scales where there is none).
inline PackedSizes check_packed_weight(const char* op, const at::Tensor& ref, const char* ref_name, const at::Tensor& b_packed,
                                const at::Tensor& scales, const std::optional<at::Tensor>& zeros, int64_t size_n,
                                int64_t size_k, int64_t group_size) {
  TORCH_CHECK(size_k > 0 && size_k % 8 == 0, op, ": size_k must be a positive multiple of 8, got ", size_k);
  TORCH_CHECK(size_n > 0 && size_n % 8 == 0, op, ": size_n must be a positive multiple of 8, got ", size_n);
  TORCH_CHECK(group_size == -1 || (group_size >= 16 && (group_size & (group_size - 1)) == 0), op,
              ": group_size must be -1 or a power of two >= 16 (hf_int4.packing re-expresses other GPTQ group "
              "sizes), got ", group_size);
  const int64_t k_pad = round_up(size_k, kPadK), n_pad = round_up(size_n, kPadN);
  const int64_t g_pad = group_size == -1 ? 1 : cdiv(k_pad, group_size);
  check_cuda_same_device(op, b_packed, "b_packed", ref, ref_name);
  TORCH_CHECK(b_packed.scalar_type() == at::kInt, op, ": b_packed must be int32, got ", b_packed.scalar_type());
  TORCH_CHECK(b_packed.dim() == 2 && b_packed.size(0) == k_pad / 16 && b_packed.size(1) == n_pad * 2, op,
              ": b_packed has shape ", shape_str(b_packed), ", expected [", k_pad / 16, ", ", n_pad * 2,
              "] for size_k=", size_k, ", size_n=", size_n);
  TORCH_CHECK(b_packed.is_contiguous(), op, ": b_packed must be contiguous");
  check_cuda_same_device(op, scales, "scales", ref, ref_name);
  TORCH_CHECK(scales.scalar_type() == ref.scalar_type(), op, ": scales are ", scales.scalar_type(), " but ", ref_name,
              " is ", ref.scalar_type(), " (pack the weight for the activation dtype)");
  TORCH_CHECK(scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kBFloat16, op,
              ": scales must be float16 or bfloat16, got ", scales.scalar_type());
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == g_pad && scales.size(1) == n_pad, op, ": scales have shape ",
              shape_str(scales), ", expected [", g_pad, ", ", n_pad, "] for size_k=", size_k, ", size_n=", size_n,
              ", group_size=", group_size);
  TORCH_CHECK(scales.is_contiguous(), op, ": scales must be contiguous");
  TORCH_CHECK(aligned16(b_packed) && aligned16(scales), op,
              ": b_packed and scales must be 16-byte aligned (use the tensors produced by hf_int4.packing)");
  if (zeros.has_value()) {
    check_cuda_same_device(op, *zeros, "zeros", ref, ref_name);
    TORCH_CHECK(zeros->scalar_type() == scales.scalar_type(), op, ": zeros are ", zeros->scalar_type(),
                " but the scales are ", scales.scalar_type());
    TORCH_CHECK(zeros->sizes() == scales.sizes(), op, ": zeros have shape ", shape_str(*zeros),
                ", expected the scales' shape ", shape_str(scales));
    TORCH_CHECK(zeros->is_contiguous() && aligned16(*zeros), op, ": zeros must be contiguous and 16-byte aligned");
  }
  return {k_pad, n_pad};
}

// The activation [..., K] as a contiguous [M, K] matrix, with the output's shape [..., N]: the GEMM ops take any
// leading dimensions, so the Python wrappers need no reshapes around them (each ~1 us of host time per call).
struct ActivationRows {
  at::Tensor a;                    // [M, K], contiguous
  std::vector<int64_t> out_shape;  // [..., N]
};
inline ActivationRows activation_rows(const char* op, const at::Tensor& a_in, int64_t size_k, int64_t size_n) {
  TORCH_CHECK(a_in.dim() >= 1 && a_in.size(-1) == size_k, op, ": the activation must be [..., K] with K=", size_k,
              " (the weight's in_features), got shape ", shape_str(a_in));
  std::vector<int64_t> out_shape(a_in.sizes().begin(), a_in.sizes().end());
  out_shape.back() = size_n;
  return {a_in.reshape({-1, size_k}).contiguous(), std::move(out_shape)};
}

// The bias, checked against the output's size and `ref` (the activation), contiguous and 16-byte aligned
// (the kernels read it in 16-byte vectors); undefined when there is none.
inline at::Tensor checked_bias(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& ref,
                               int64_t size_n) {
  if (!bias.has_value()) return at::Tensor();
  check_cuda_same_device(op, *bias, "bias", ref, "the activation");
  TORCH_CHECK(bias->scalar_type() == ref.scalar_type(), op, ": bias is ", bias->scalar_type(),
              " but the activation is ", ref.scalar_type());
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == size_n, op, ": bias has shape ", shape_str(*bias),
              ", expected [", size_n, "]");
  at::Tensor b = bias->contiguous();
  return aligned16(b) ? b : b.clone();
}

}  // namespace hf_int4
