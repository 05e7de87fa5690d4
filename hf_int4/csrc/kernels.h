// Host-side API of the int4 GEMM, dequantize and repack kernels, shared by ops.cpp (host compiler) and the .cu
// translation units (nvcc). Deliberately free of torch headers so that the kernels compile fast.
//
// Packed weight layout (see hf_int4/packing.py for the Python mirror of every formula):
//   K_pad = round_up(K, 64), N_pad = round_up(N, 128).
//   b_packed int32 [K_pad / 16, N_pad * 2]: CUTLASS's reordered int4 layout for Hopper's RS wgmma
//   (compute_memory_reordering_atom, value shuffle [0,2,4,6,1,3,5,7], one atom), shared by every kernel.
//   Row kb holds the 16-row k-block kb as N_pad / 16 atoms of 32 words; word (kb, a, lane) at column
//   32 a + lane holds the 8 weights of lane `lane` in the 16x16 tile (rows 16 kb.., columns 16 a..).
//   With g = lane / 4, t = lane % 4, nibble slot i (bits 4i..4i+3) = 4 * odd + 2 * upper + h holds
//       k = 16 kb + 2 t + odd + 8 upper,   n = 16 a + 8 h + g
//   as a signed int4, q - 8 (the nibble q ^ 8).
//   scales / zeros [G_pad, N_pad] in the activation dtype, natural column order (CUTLASS's N-major
//   scales). zeros hold (magic + z): fp16 1024 + z, bf16 128 + z.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace hf_int4 {

struct Int4GemmArgs {
  const void* a = nullptr;       // [m, size_k] activation dtype, row-major, 16-byte aligned
  const void* b = nullptr;       // packed int32 [k_pad / 16, n_pad * 2]
  const void* scales = nullptr;  // [g_pad, n_pad] activation dtype, permuted
  const void* zeros = nullptr;   // [g_pad, n_pad] (magic + z), permuted; nullptr: symmetric (z = 8)
  const void* bias = nullptr;    // [size_n] activation dtype or nullptr
  void* c = nullptr;             // [m, size_n] activation dtype
  int* workspace = nullptr;      // kCounterInts zeroed int32 counters (kernels leave them zero), then fp32 partials
  int64_t workspace_size = 0;    // int32 entries in workspace
  int m = 0;
  int size_n = 0, size_k = 0;    // logical sizes
  int n_pad = 0, k_pad = 0;      // packed sizes
  int group_size = 0;            // effective group size in rows (k_pad for per-channel)
  int thread_n = -1, thread_k = -1;  // tile override (-1: heuristic)
  int sms = -1;                  // tiled kernel: thread blocks (-1: one per SM); streaming kernel (M <= 8): k-splits
  // up_offset > 0 (m <= kStreamMaxRows): a gated MLP's down projection. a is [m, lda] and holds the gate in columns
  // [0, size_k) and the up projection from column up_offset; the GEMM's input is silu(gate) * up.
  int up_offset = 0, lda = 0;
  int device = 0;
  cudaStream_t stream = nullptr;
};

// Returns nullptr on success, else a static error message (the caller raises it).
const char* int4_gemm_fp16(const Int4GemmArgs& args);
const char* int4_gemm_bf16(const Int4GemmArgs& args);

// GPTQ qweight int32 [size_k / 8, size_n] (+ optional row permutation perm int32 [size_k]: packed row
// i takes GPTQ row perm[i]) -> b_packed int32 [k_pad / 16, n_pad * 2]; padding nibbles are 8.
const char* repack_gptq_launch(const int32_t* qweight, const int32_t* perm, int32_t* out, int size_k,
                               int size_n, int k_pad, int n_pad, cudaStream_t stream);

// Packed weight -> W^T [size_n, size_k] in the activation dtype (F.linear's weight layout; rows of K in
// packed order, so act-order callers gather x[:, perm] first). Each value is (q - z) * s rounded once, the
// same number the GEMM kernel multiplies. w must hold size_n * size_k elements, 16-byte aligned.
const char* dequantize_int4_fp16(const void* b, const void* scales, const void* zeros, void* w, int size_n,
                                 int size_k, int n_pad, int k_pad, int group_size, cudaStream_t stream);
const char* dequantize_int4_bf16(const void* b, const void* scales, const void* zeros, void* w, int size_n,
                                 int size_k, int n_pad, int k_pad, int group_size, cudaStream_t stream);

// A gated MLP's input to its down projection (silu_mul.cu): out [rows, size_k] (contiguous) = silu(h[r, j]) *
// h[r, up_offset + j], with h [rows, ldh] holding the gate in columns [0, size_k) and the up projection from
// up_offset, as the streaming kernel forms it from a gated input.
const char* silu_mul_fp16(const void* h, void* out, int64_t rows, int size_k, int64_t ldh, int up_offset,
                          cudaStream_t stream);
const char* silu_mul_bf16(const void* h, void* out, int64_t rows, int size_k, int64_t ldh, int up_offset,
                          cudaStream_t stream);

// Workspace: kCounterInts int32 arrival counters (zero between launches), then room for fp32 partial tiles,
// two per thread block of up to 64 x 256 floats. int4_gemm_workspace_ints(sms) covers a launch of `sms` blocks.
constexpr int kCounterInts = 1 << 16;
constexpr int64_t int4_gemm_workspace_ints(int sms) { return kCounterInts + int64_t(2) * sms * 64 * 256; }
constexpr int kPadK = 64;
constexpr int kStreamMaxRows = 8;  // rows the streaming kernel takes (stream_gemm.cuh)
constexpr int kPadN = 128;

constexpr int kReadFloorThreads = 512;  // hf_int4.ops.READ_FLOOR_THREADS
constexpr int kReadFloorBuffers = 3;
// The benchmark's floor (read_floor.cuh): reads count (1 .. kReadFloorBuffers, checked by the caller) buffers of
// bytes[j] bytes (16-byte aligned, whole 16-byte words) with `blocks` blocks; thread g stores the xor of the 32-bit
// words it read to sink[g] if it equals key.
const char* read_floor_launch(const void* const* buffers, const int64_t* bytes, int count, int key, int* sink,
                              int blocks, cudaStream_t stream);

}  // namespace hf_int4
