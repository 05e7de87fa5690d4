// torch.ops.hf_int4.*: schemas, CUDA implementations (shape / dtype checks) and the workspace cache.
// Importing `hf_int4._C` registers everything; the fake (meta) implementations live in hf_int4/ops.py.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

#include "kernels.h"
#include "op_checks.h"

namespace hf_int4 {
namespace {

// One workspace per (device, stream): zeroed int32 counters, which every kernel leaves zero again, and fp32
// partial tiles. Allocated once and reused by every call on that stream (no allocation / memset in the hot path).
// A buffer first created while the stream is being captured into a CUDA graph is only zeroed when that
// graph replays, so it is re-zeroed on its first use outside that capture (and captured once more in any
// other capture that uses it before then).
struct WorkspaceEntry {
  at::Tensor t;
  bool clean = false;                    // known zero on the stream timeline
  unsigned long long zeroed_in_capture = 0;
};

at::Tensor cached_workspace(const at::Device& device, cudaStream_t stream) {
  static std::mutex mu;
  static std::map<std::pair<int, uintptr_t>, WorkspaceEntry> cache;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  unsigned long long capture_id = 0;
  C10_CUDA_CHECK(cudaStreamGetCaptureInfo(stream, &status, &capture_id));
  const bool capturing = status == cudaStreamCaptureStatusActive;
  std::lock_guard<std::mutex> guard(mu);
  const auto key = std::make_pair(static_cast<int>(device.index()), reinterpret_cast<uintptr_t>(stream));
  auto it = cache.find(key);
  if (it == cache.end()) {
    WorkspaceEntry e;
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device.index()));
    // Plain cudaMalloc, not torch's caching allocator: created during a capture, a caching-allocator block
    // would belong to that graph's private pool and outlive it (torch.compile's CUDA-graph trees reject
    // that). cudaMalloc is allowed during a capture in relaxed mode. The buffer lives as long as the process.
    const int64_t ints = int4_gemm_workspace_ints(sms);
    void* ptr = nullptr;
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
    const cudaError_t alloc = cudaMalloc(&ptr, ints * sizeof(int));
    C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
    C10_CUDA_CHECK(alloc);
    e.t = at::from_blob(ptr, {ints}, [](void*) {}, at::TensorOptions().dtype(at::kInt).device(device));
    // only the counters need zeroing; the partials are written before they are read
    e.t.narrow(0, 0, kCounterInts).zero_();  // on `stream`
    e.clean = !capturing;
    e.zeroed_in_capture = capturing ? capture_id : 0;
    return cache.emplace(key, std::move(e)).first->second.t;
  }
  WorkspaceEntry& e = it->second;
  if (!e.clean) {
    if (!capturing) {
      e.t.narrow(0, 0, kCounterInts).zero_();
      e.clean = true;
    } else if (e.zeroed_in_capture != capture_id) {
      e.t.narrow(0, 0, kCounterInts).zero_();
      e.zeroed_in_capture = capture_id;
    }
  }
  return e.t;
}

at::Tensor int4_gemm_cuda(const at::Tensor& a_in, const at::Tensor& b_packed, const at::Tensor& scales,
                          const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& workspace,
                          int64_t size_n, int64_t size_k, int64_t group_size, const std::optional<at::Tensor>& bias,
                          int64_t thread_n, int64_t thread_k, int64_t sms, int64_t up_offset) {
  const char* op = "hf_int4::int4_gemm";
  TORCH_CHECK(a_in.is_cuda(), op, ": the activation must be a CUDA tensor, got device ", a_in.device());
  TORCH_CHECK(a_in.scalar_type() == at::kHalf || a_in.scalar_type() == at::kBFloat16, op,
              ": the activation must be float16 or bfloat16, got ", a_in.scalar_type());
  TORCH_CHECK(up_offset >= 0, op, ": up_offset must be >= 0, got ", up_offset);
  const int64_t width = up_offset > 0 && a_in.dim() >= 1 ? a_in.size(-1) : size_k;
  if (up_offset > 0)
    TORCH_CHECK(up_offset >= size_k && up_offset % 8 == 0 && width >= up_offset + size_k && width % 8 == 0, op,
                ": a gated input holds the gate in columns [0, ", size_k, ") and the up projection from column "
                "up_offset (a multiple of 8, >= ", size_k, "), rows of a multiple of 8 columns; got up_offset=",
                up_offset, " and shape ", shape_str(a_in));
  ActivationRows rows = activation_rows(op, a_in, width, size_n);
  const PackedSizes sizes =
      check_packed_weight(op, a_in, "the activation", b_packed, scales, zeros, size_n, size_k, group_size);
  const int64_t k_pad = sizes.k_pad, n_pad = sizes.n_pad;
  const void* zeros_ptr = zeros.has_value() ? zeros->data_ptr() : nullptr;
  const at::Tensor bias_c = checked_bias(op, bias, a_in, size_n);
  TORCH_CHECK(thread_n == -1 || thread_n == 128 || thread_n == 256, op, ": thread_n must be -1, 128 or 256");
  TORCH_CHECK(thread_k == -1 || thread_k == 64 || thread_k == 128, op, ": thread_k must be -1, 64 or 128");

  at::Tensor a = std::move(rows.a);
  // only the streaming kernel forms silu(gate) * up itself (hf_int4.ops.int4_gemm forms it first for more rows)
  TORCH_CHECK(up_offset == 0 || a.size(0) <= kStreamMaxRows, op, ": a gated input takes at most ", kStreamMaxRows,
              " rows, got ", a.size(0));
  if (!aligned16(a)) a = a.clone();  // rows are 16-byte multiples; only the base can be misaligned

  const c10::cuda::CUDAGuard device_guard(a.device());
  const int64_t M = a.size(0);
  at::Tensor c = at::empty({M, size_n}, a.options());
  if (M == 0) return c.view(rows.out_shape);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.device().index()).stream();

  at::Tensor ws;
  if (workspace.has_value()) {
    ws = *workspace;
    TORCH_CHECK(ws.is_cuda() && ws.device() == a.device(), op, ": workspace must be on ", a.device());
    TORCH_CHECK(ws.scalar_type() == at::kInt && ws.is_contiguous(), op, ": workspace must be a contiguous int32 tensor");
    TORCH_CHECK(ws.numel() >= kCounterInts, op, ": workspace has ", ws.numel(), " entries, need at least ",
                kCounterInts, " (zero-initialised counters) plus room for partial tiles (",
                int4_gemm_workspace_ints(1) - kCounterInts, " per two thread blocks)");
  } else {
    ws = cached_workspace(a.device(), stream);
  }
  TORCH_CHECK(M <= INT32_MAX && k_pad * n_pad / 16 < INT32_MAX, op, ": problem too large");

  Int4GemmArgs args;
  args.a = a.data_ptr();
  args.b = b_packed.data_ptr();
  args.scales = scales.data_ptr();
  args.zeros = zeros_ptr;
  args.bias = bias_c.defined() ? bias_c.data_ptr() : nullptr;
  args.c = c.data_ptr();
  args.workspace = ws.data_ptr<int>();
  args.workspace_size = ws.numel();
  args.m = static_cast<int>(M);
  args.size_n = static_cast<int>(size_n);
  args.size_k = static_cast<int>(size_k);
  args.n_pad = static_cast<int>(n_pad);
  args.k_pad = static_cast<int>(k_pad);
  args.group_size = static_cast<int>(group_size == -1 ? k_pad : group_size);
  args.thread_n = static_cast<int>(thread_n);
  args.thread_k = static_cast<int>(thread_k);
  args.sms = static_cast<int>(sms);
  args.up_offset = static_cast<int>(up_offset);
  args.lda = static_cast<int>(a.size(1));
  args.device = a.device().index();
  args.stream = stream;
  const char* err = a.scalar_type() == at::kHalf ? int4_gemm_fp16(args) : int4_gemm_bf16(args);
  TORCH_CHECK(err == nullptr, err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return c.view(rows.out_shape);
}

at::Tensor dequantize_int4_cuda(const at::Tensor& b_packed, const at::Tensor& scales,
                                const std::optional<at::Tensor>& zeros, int64_t size_n, int64_t size_k,
                                int64_t group_size) {
  const char* op = "hf_int4::dequantize_int4";
  TORCH_CHECK(scales.is_cuda(), op, ": scales must be a CUDA tensor, got device ", scales.device());
  const PackedSizes sizes =
      check_packed_weight(op, scales, "the scales", b_packed, scales, zeros, size_n, size_k, group_size);
  TORCH_CHECK(sizes.k_pad * sizes.n_pad / 16 < INT32_MAX, op, ": weight too large");
  const c10::cuda::CUDAGuard device_guard(scales.device());
  at::Tensor w = at::empty({size_n, size_k}, scales.options());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(scales.device().index()).stream();
  const int gs = static_cast<int>(group_size == -1 ? sizes.k_pad : group_size);
  const void* z = zeros.has_value() ? zeros->data_ptr() : nullptr;
  const auto launch = scales.scalar_type() == at::kHalf ? dequantize_int4_fp16 : dequantize_int4_bf16;
  const char* err = launch(b_packed.data_ptr(), scales.data_ptr(), z, w.data_ptr(), static_cast<int>(size_n),
                           static_cast<int>(size_k), static_cast<int>(sizes.n_pad), static_cast<int>(sizes.k_pad), gs,
                           stream);
  TORCH_CHECK(err == nullptr, err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return w;
}

at::Tensor repack_gptq_cuda(const at::Tensor& qweight, const std::optional<at::Tensor>& perm, int64_t size_k,
                            int64_t size_n) {
  const char* op = "hf_int4::repack_gptq";
  TORCH_CHECK(qweight.is_cuda(), op, ": qweight must be a CUDA tensor, got device ", qweight.device());
  TORCH_CHECK(qweight.scalar_type() == at::kInt, op, ": qweight must be int32, got ", qweight.scalar_type());
  TORCH_CHECK(size_k > 0 && size_k % 8 == 0 && size_n > 0 && size_n % 8 == 0, op,
              ": size_k and size_n must be positive multiples of 8, got ", size_k, " and ", size_n);
  TORCH_CHECK(qweight.dim() == 2 && qweight.size(0) == size_k / 8 && qweight.size(1) == size_n, op,
              ": qweight has shape ", shape_str(qweight), ", expected [", size_k / 8, ", ", size_n, "]");
  const at::Tensor q = qweight.contiguous();
  at::Tensor p;
  if (perm.has_value()) {
    p = perm->contiguous();
    TORCH_CHECK(p.device() == q.device(), op, ": perm is on ", p.device(), " but qweight is on ", q.device());
    TORCH_CHECK(p.scalar_type() == at::kInt && p.dim() == 1 && p.size(0) == size_k, op,
                ": perm must be int32 [", size_k, "], got ", p.scalar_type(), " ", shape_str(p));
    // Pack time only: a host sync here is fine, an out-of-range index would read out of bounds.
    TORCH_CHECK(p.min().item<int>() >= 0 && p.max().item<int>() < size_k, op, ": perm has values outside [0, ",
                size_k, ")");
  }
  const int64_t k_pad = round_up(size_k, kPadK), n_pad = round_up(size_n, kPadN);
  const c10::cuda::CUDAGuard device_guard(q.device());
  at::Tensor out = at::empty({k_pad / 16, n_pad * 2}, q.options());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  const char* err = repack_gptq_launch(q.data_ptr<int32_t>(), p.defined() ? p.data_ptr<int32_t>() : nullptr,
                                       out.data_ptr<int32_t>(), static_cast<int>(size_k), static_cast<int>(size_n),
                                       static_cast<int>(k_pad), static_cast<int>(n_pad), stream);
  TORCH_CHECK(err == nullptr, err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor silu_mul_cuda(const at::Tensor& h, int64_t size_k, int64_t up_offset) {
  const char* op = "hf_int4::silu_mul";
  TORCH_CHECK(h.is_cuda(), op, ": h must be a CUDA tensor, got device ", h.device());
  TORCH_CHECK(h.scalar_type() == at::kHalf || h.scalar_type() == at::kBFloat16, op,
              ": h must be float16 or bfloat16, got ", h.scalar_type());
  TORCH_CHECK(h.dim() >= 1 && size_k > 0 && up_offset >= size_k && h.size(-1) >= up_offset + size_k &&
                  up_offset + size_k <= INT32_MAX, op, ": h holds the gate in columns [0, size_k) and the up projection in ",
              "[up_offset, up_offset + size_k), up_offset >= size_k; got size_k=", size_k, ", up_offset=", up_offset,
              " and h of shape ", shape_str(h));
  // rows of h as one strided dimension (a view wherever the leading dimensions allow, as a GEMM's output always does)
  at::Tensor rows = h.dim() == 1 ? h.unsqueeze(0) : h.reshape({-1, h.size(-1)});
  if (rows.stride(-1) != 1) rows = rows.contiguous();
  std::vector<int64_t> sizes = h.sizes().vec();
  sizes.back() = size_k;
  at::Tensor out = at::empty(sizes, h.options());
  const c10::cuda::CUDAGuard device_guard(h.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(h.device().index()).stream();
  const int64_t ldh = rows.size(0) > 1 ? rows.stride(0) : rows.size(1);
  const auto launch = h.scalar_type() == at::kHalf ? silu_mul_fp16 : silu_mul_bf16;
  const char* err = launch(rows.data_ptr(), out.data_ptr(), rows.size(0), static_cast<int>(size_k), ldh,
                           static_cast<int>(up_offset), stream);
  TORCH_CHECK(err == nullptr, err);
  return out;
}

void read_floor_cuda(at::TensorList buffers, const at::Tensor& sink, int64_t key) {
  const char* op = "hf_int4::read_floor";
  TORCH_CHECK(sink.is_cuda() && sink.scalar_type() == at::kInt && sink.dim() == 1 && sink.is_contiguous() &&
                  sink.numel() > 0 && sink.numel() % kReadFloorThreads == 0 && sink.numel() <= INT32_MAX,
              op, ": sink must be a contiguous 1-D int32 CUDA tensor of a positive multiple of ", kReadFloorThreads,
              " entries (one per thread), got ",
              sink.scalar_type(), " ", shape_str(sink), " on ", sink.device());
  TORCH_CHECK(!buffers.empty() && buffers.size() <= kReadFloorBuffers, op, ": one to three buffers, got ",
              buffers.size());
  const void* ptrs[kReadFloorBuffers];
  int64_t bytes[kReadFloorBuffers];
  for (size_t j = 0; j < buffers.size(); ++j) {
    const at::Tensor& t = buffers[j];
    check_cuda_same_device(op, t, "buffer", sink, "sink");
    const int64_t n = t.numel() * t.element_size();
    TORCH_CHECK(t.is_contiguous() && n % 16 == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, op,
                ": buffer ", j, " must be contiguous, 16-byte aligned and a multiple of 16 bytes, got ", n, " bytes");
    ptrs[j] = t.data_ptr();
    bytes[j] = n;
  }
  const c10::cuda::CUDAGuard device_guard(sink.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(sink.device().index()).stream();
  const char* err = read_floor_launch(ptrs, bytes, static_cast<int>(buffers.size()), static_cast<int>(key),
                                      sink.data_ptr<int>(), static_cast<int>(sink.numel() / kReadFloorThreads),
                                      stream);
  TORCH_CHECK(err == nullptr, err);
}

at::Tensor int4_gemm_cpu(const at::Tensor& a, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                         const std::optional<at::Tensor>&, int64_t, int64_t, int64_t, const std::optional<at::Tensor>&,
                         int64_t, int64_t, int64_t, int64_t) {
  TORCH_CHECK(false, "hf_int4::int4_gemm runs on CUDA tensors only, got a tensor on ", a.device(),
              "; use hf_int4.reference for CPU");
}

at::Tensor dequantize_int4_cpu(const at::Tensor& b_packed, const at::Tensor&, const std::optional<at::Tensor>&,
                               int64_t, int64_t, int64_t) {
  TORCH_CHECK(false, "hf_int4::dequantize_int4 runs on CUDA tensors only, got a tensor on ", b_packed.device(),
              "; use hf_int4.reference.dequantize_packed for CPU");
}

at::Tensor repack_gptq_cpu(const at::Tensor& qweight, const std::optional<at::Tensor>&, int64_t, int64_t) {
  TORCH_CHECK(false, "hf_int4::repack_gptq runs on CUDA tensors only, got a tensor on ", qweight.device(),
              "; use hf_int4.packing.pack_gptq_layer_cpu for CPU");
}

}  // namespace
}  // namespace hf_int4

TORCH_LIBRARY(hf_int4, m) {
  m.set_python_module("hf_int4.ops");
  m.def(
      "int4_gemm(Tensor a, Tensor b_packed, Tensor scales, Tensor? zeros, Tensor? workspace, int size_n, "
      "int size_k, int group_size, Tensor? bias, int thread_n=-1, int thread_k=-1, int sms=-1, int up_offset=0) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def("dequantize_int4(Tensor b_packed, Tensor scales, Tensor? zeros, int size_n, int size_k, int group_size) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("repack_gptq(Tensor qweight, Tensor? perm, int size_k, int size_n) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("silu_mul(Tensor h, int size_k, int up_offset) -> Tensor", {at::Tag::pt2_compliant_tag});
  // the benchmark's floor: reads the buffers, nothing else (hf_int4.bench, read_x); key: see read_floor.cuh
  m.def("read_floor(Tensor[] buffers, Tensor(a!) sink, int key) -> ()");
}

TORCH_LIBRARY_IMPL(hf_int4, CUDA, m) {
  m.impl("int4_gemm", &hf_int4::int4_gemm_cuda);
  m.impl("dequantize_int4", &hf_int4::dequantize_int4_cuda);
  m.impl("repack_gptq", &hf_int4::repack_gptq_cuda);
  m.impl("silu_mul", &hf_int4::silu_mul_cuda);
  m.impl("read_floor", &hf_int4::read_floor_cuda);
}

TORCH_LIBRARY_IMPL(hf_int4, CPU, m) {
  m.impl("int4_gemm", &hf_int4::int4_gemm_cpu);
  m.impl("dequantize_int4", &hf_int4::dequantize_int4_cpu);
  m.impl("repack_gptq", &hf_int4::repack_gptq_cpu);
}

// `from hf_int4 import _C` loads this library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "hf_int4 CUDA kernels; importing registers torch.ops.hf_int4.*", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
