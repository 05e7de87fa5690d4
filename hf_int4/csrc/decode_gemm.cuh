// Mixed-precision GEMM C[M, N] = A[M, K] @ dequant(W)[K, N] for 4-bit GPTQ weights (fp16 / bf16
// activations, fp32 accumulation), built for decode (M = 1..64) at HBM bandwidth. run_int4_gemm (below) runs
// blocks of at most stream::kMaxRows rows with the streaming kernel (stream_gemm.cuh) and the rest with this
// tiled kernel.
//
// Design (after Marlin, IST-DASLab): 256 threads = 8 warps per block; a block tile is 16 MB rows x TN
// columns x TK rows of K. The TN / 64 "n-warps" own 64 columns each, the 8 / (TN / 64) "k-warps" split the
// tile's 16-row k-blocks between them and are summed in shared memory at the end. A, B, scales and zeros
// stream global -> shared through a cp.async pipeline (kStages = 4 deep). B is read once, with no L2
// eviction hint: on the project's H100 with CUDA 13 every cp.async with an L2::cache_hint policy (Marlin's
// evict_first idiom) faults with "illegal instruction". A fragments come from ldmatrix (XOR-swizzled,
// conflict free), B fragments are four words per lane per 16x64 warp tile (one per 16x16 atom of the shared
// CUTLASS layout, kernels.h), dequantized with lop3 magic numbers and fed to
// mma.m16n8k16 (fp32 accumulators, double-buffered fragments).
//
// Work split: the (k-tile, n-tile, m-problem) grid is cut into equal contiguous "stripes" of k-tiles
// (column-major) over gridDim.x = #SMs blocks. A column ("slice") covered by one block is written out
// directly. When several blocks share a column, each stores its fp32 partial tile in the workspace and
// bumps the column's arrival counter; the block that arrives last sums the partials in the fixed order of
// their k-ranges (so results are deterministic whatever the arrival order), adds the bias, writes C and
// resets the counter to 0 (the counters stay zero between launches, hence CUDA-graph safe). Nobody waits
// for anybody, so the tail is one reduction step and blocks need not be co-resident. M > 64 runs as
// several 64-row problems inside one launch ("par") plus a remainder launch.
//
// Early launch (9..16 rows, sm_90): behind another int4 GEMM, a launch may start while that one finishes its
// reduction tail (programmatic dependent launch); its blocks request their first weights at once and wait
// for the earlier kernel only before reading activations or the workspace (start_pipeline, launch_one).
//
// Dequant: (q | magic) - (magic + z) == q - z exactly (fp16 magic 1024, bf16 magic 128), then times the
// group scale. Zeros are (magic + z) in the activation dtype; symmetric weights use the constant
// magic + 8 (zero registers set once), so sym and asym share one code path.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "early_launch.h"
#include "gemm_common.cuh"
#include "kernels.h"
#include "stream_gemm.cuh"

namespace hf_int4 {
namespace gemm {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// cp.async pipeline depth (a tuning knob: Tile::STAGES may depend on the tile; must keep STAGES * SUB even)
#ifndef HF_INT4_STAGES
#define HF_INT4_STAGES 4
#endif
constexpr int kStages = HF_INT4_STAGES;
constexpr int kMaxPar = 16;  // 64-row problems per launch

// ------------------------------------------------------------------------------------ tile geometry

template <int MB, int TN, int TK>
struct Tile {
  static constexpr int STAGES = kStages;
  static constexpr int NW = TN / 64;           // warps along n (64 columns each)
  static constexpr int KW = kWarps / NW;       // warps along k
  static constexpr int TKB = TK / 16;          // 16-row k-blocks per tile
  static constexpr int SUB = TKB / KW;         // k-blocks per warp per tile
  static constexpr int A_ROW = TK / 8;         // int4 per A row of a tile
  static constexpr int A_STAGE = 16 * MB * A_ROW;
  static constexpr int A_ITERS = ceil_div(A_STAGE, kThreads);
  static constexpr int A_ROW_STEP = kThreads / A_ROW;  // rows between a thread's A loads
  static constexpr int B_KROW = NW * 32;       // int4 per k-block of a tile
  static constexpr int B_STAGE = TKB * B_KROW;
  static constexpr int B_ITERS = B_STAGE / kThreads;
  static constexpr int S_ROW = TN / 8;         // int4 per scale row of a tile
  static constexpr int S_STAGE = TKB * S_ROW;  // room for one group per k-block (group size >= 16)
  static constexpr int RED_STRIDE = TN + 8;    // floats per row of the reduction buffer (bank spread)
  static constexpr int RED_INT4 = KW * 16 * RED_STRIDE / 4;
  static constexpr int PART_FLOATS = 16 * MB * TN;  // one fp32 partial tile in the workspace
  // shared memory map, in int4
  static constexpr int SM_A = 0;
  static constexpr int SM_B = SM_A + STAGES * A_STAGE;
  static constexpr int SM_S = SM_B + STAGES * B_STAGE;
  static constexpr int SM_PIPE_END = SM_S + STAGES * S_STAGE;
  static constexpr int SM_Z = cmax(SM_PIPE_END, RED_INT4);  // zeros never overlap the reduction buffer
  static constexpr int SM_TOTAL = SM_Z + STAGES * S_STAGE;
  static constexpr int SMEM_BYTES = SM_TOTAL * 16;

  static_assert(TN % 64 == 0 && kWarps % NW == 0, "TN must be 64 * a divisor of 8");
  static_assert(TKB % KW == 0 && SUB >= 1, "each k-warp needs whole k-blocks");
  static_assert(B_STAGE % kThreads == 0, "B stage must split evenly over the threads");
  static_assert(kThreads % A_ROW == 0 && A_ROW_STEP % 8 == 0, "A swizzle assumes 8-row periods");
  static_assert(S_STAGE <= kThreads, "one thread per scale int4");
  static_assert((STAGES * SUB) % 2 == 0, "register double buffer must wrap evenly");
};

// ------------------------------------------------------------------------------------------- PTX

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; src_size 0 zero-fills the destination (predication for rows >= M, k >= K).
__device__ __forceinline__ void cp_async16_zfill(void* smem, const void* gmem, bool pred) {
  const int src_size = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(src_size));
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(smem)), "l"(gmem));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}

// q - z times s for the two weights in bits 0-3 and 16-19 of x, in either activation dtype; zeros / scales:
// half `hi` of the words.
template <typename T, int hi>
__device__ __forceinline__ uint32_t dequant2(uint32_t x, uint32_t zeros, uint32_t scales) {
  using A = Act<T>;
  using T2 = typename A::T2;
  const uint32_t v = raw_pair<A::kMagic2>(x);
  const T2 r = __hmul2(__hsub2(*reinterpret_cast<const T2*>(&v), A::template broadcast<hi>(*reinterpret_cast<const T2*>(&zeros))),
                       A::template broadcast<hi>(*reinterpret_cast<const T2*>(&scales)));
  return *reinterpret_cast<const uint32_t*>(&r);
}

// v[0..7] += the 8 floats of a and b (a reduction's step over 8 consecutive columns).
__device__ __forceinline__ void add8(float (&v)[8], const float4 a, const float4 b) {
  v[0] += a.x; v[1] += a.y; v[2] += a.z; v[3] += a.w;
  v[4] += b.x; v[5] += b.y; v[6] += b.z; v[7] += b.w;
}

// --------------------------------------------------------------------------------------- kernel

struct KernelParams {
  const int4* a;
  const int4* b;
  const int4* scales;
  const int4* zeros;  // nullptr: symmetric
  const uint16_t* bias;
  uint16_t* c;
  int* counters;     // per slice column: arrivals of the blocks that share it (zero between launches)
  float* partials;   // 2 * gridDim.x slots of Tile::PART_FLOATS floats (slot 2 b: first slice of block b, 2 b + 1: last)
  int m;      // rows of A / C in this launch
  int par;    // 16 * MB-row problems in this launch
  int size_n, size_k, n_pad, k_pad;
  int group_shift;  // log2(group size) for a power-of-two group size; 31 for one group (per-channel)
  bool early;       // launched early behind another kernel (launch_one): split prologue, see start_pipeline
};

template <typename T, int MB, int TN, int TK>
__global__ void __launch_bounds__(kThreads, 1) int4_gemm_kernel(const KernelParams p) {
  using L = Tile<MB, TN, TK>;
  using D = Act<T>;
  constexpr int NW = L::NW, KW = L::KW, TKB = L::TKB, SUB = L::SUB;
  constexpr int A_ROW = L::A_ROW, A_STAGE = L::A_STAGE, A_ITERS = L::A_ITERS;
  constexpr int B_KROW = L::B_KROW, B_STAGE = L::B_STAGE, B_ITERS = L::B_ITERS;
  constexpr int S_ROW = L::S_ROW, S_STAGE = L::S_STAGE, RS = L::RED_STRIDE;
  constexpr int ST = L::STAGES;

  extern __shared__ int4 sh[];

  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int nw = warp % NW, kwi = warp / NW;
  const int g = lane >> 2, t4 = lane & 3;

  // ---- the stripe of tiles of this block
  const int k_tiles = p.k_pad / TK;
  const int n_tiles = p.n_pad / TN;
  const int total = k_tiles * n_tiles * p.par;
  const int iters = ceil_div(total, gridDim.x);
  int tile = blockIdx.x * iters;
  const int tile_end = min(total, tile + iters);
  if (tile >= tile_end) return;

  const int kchunks = p.size_k / 8;          // int4 per row of A
  const int b_kb_stride = p.n_pad / 2;        // int4 per 16-row k-block of B
  const int s_stride = p.n_pad / 8;           // int4 per row of scales / zeros
  const int gshift = p.group_shift;
  const bool has_zp = p.zeros != nullptr;
  const int s_rows = (TK - 1) >> gshift ? TK >> gshift : 1;  // groups per tile

  // A tile's k-blocks share one scale row when the group spans the whole tile (the common g128 case):
  // then the scale / zero registers are loaded once per tile instead of once per k-block.
  const bool scales_per_tile = ((TK - 1) >> gshift) == 0;

  // ---- per-thread constant offsets
  // A: thread loads chunk a_ch of rows a_row0 + it * A_ROW_STEP; smem chunk XOR-swizzled by row % 8.
  const int a_row0 = tid / A_ROW, a_ch = tid % A_ROW;
  const int a_sh_wr = a_row0 * A_ROW + (a_ch ^ (a_row0 & 7));
  // ldmatrix: lane supplies row (lane % 16) of chunk 2 * kblock + lane / 16.
  int a_sh_rd[SUB];
#pragma unroll
  for (int s = 0; s < SUB; ++s) {
    const int ch = 2 * (s * KW + kwi) + (lane >> 4);
    a_sh_rd[s] = (lane & 15) * A_ROW + (ch ^ (lane & 7));
  }
  // the lane's word of atom j of its 64 columns: word 32 j + lane of the warp's 512-byte group
  const int b_sh_rd = (kwi * B_KROW + nw * 32) * 4 + lane;
  // Scales / zeros are in natural column order; the lane needs columns 16 j + 8 h + g of its warp's 64 as
  // word j (half h). One ldmatrix.x4.trans does it: matrix j's 8 rows are the 16-byte chunks 2 j, 2 j + 1,
  // 2 j, 2 j + 1, ... (rows may repeat), and transposed it hands lane 4 g + t the elements (row 2 t,
  // col g) and (row 2 t + 1, col g): columns 16 j + g and 16 j + 8 + g. Lane L supplies row L % 8 of
  // matrix L / 8. Offsets in halves.
  int s_sh_rd[SUB];
#pragma unroll
  for (int s = 0; s < SUB; ++s) {
    const int srow = ((s * KW + kwi) * 16) >> gshift;
    s_sh_rd[s] = srow * S_ROW * 8 + nw * 64 + (2 * (lane >> 3) + (lane & 1)) * 8;
  }
  const bool s_loader = tid < s_rows * S_ROW;
  const int s_ld_row = tid / S_ROW, s_ld_col = tid % S_ROW;

  // ---- slice state
  int slice_iters, slice_col, first_blk, last_blk, nc, rows_valid;
  uint16_t* c_prob;     // C + first row of the problem
  bool a_row_ok[A_ITERS];
  // running fetch state: advanced by one k-tile per fetch()
  const int4* a_next;   // this thread's first A chunk of the next tile
  int a_chunk_next;     // its k-chunk index (predication against K)
  const int4* b_next;   // this thread's first B int4 of the next tile
  int kt_next;          // k-tile index of the next tile
  const int64_t b_tile_stride = static_cast<int64_t>(TKB) * b_kb_stride;
  const int64_t a_it_stride = static_cast<int64_t>(L::A_ROW_STEP) * kchunks;
  const int64_t b_it_stride = static_cast<int64_t>(kThreads / B_KROW) * b_kb_stride;
  const int b_thread_off = (tid / B_KROW) * b_kb_stride + tid % B_KROW;

  auto init_slice = [&]() {
    const int col = tile / k_tiles;
    const int kt0 = tile % k_tiles;
    slice_iters = min(k_tiles - kt0, tile_end - tile);
    slice_col = col;
    first_blk = (col * k_tiles) / iters;
    last_blk = ((col + 1) * k_tiles - 1) / iters;
    const int prob = col / n_tiles;
    nc = col % n_tiles;
    rows_valid = min(16 * MB, p.m - prob * 16 * MB);
    c_prob = p.c + static_cast<int64_t>(prob) * 16 * MB * p.size_n;
    kt_next = kt0;
    a_chunk_next = kt0 * A_ROW + a_ch;
    a_next = p.a + (static_cast<int64_t>(prob) * 16 * MB + a_row0) * kchunks + a_chunk_next;
    b_next = p.b + kt0 * b_tile_stride + nc * B_KROW + b_thread_off;
#pragma unroll
    for (int it = 0; it < A_ITERS; ++it)
      a_row_ok[it] = (A_STAGE % kThreads == 0 || tid + it * kThreads < A_STAGE) &&
                     a_row0 + it * L::A_ROW_STEP < rows_valid;
  };

  // ---- global -> shared for the next tile of the slice into pipeline stage `stage`, in two parts: the
  // weights (B, scales, zeros) depend on no earlier kernel, the activations (A) may be the previous one's output.
  auto fetch_weights = [&](int stage) {
    int4* sb = sh + L::SM_B + stage * B_STAGE + tid;
#pragma unroll
    for (int it = 0; it < B_ITERS; ++it) cp_async16(sb + it * kThreads, b_next + it * b_it_stride);
    if (s_loader) {
      const int grp = ((kt_next * TK) >> gshift) + s_ld_row;
      const int off = grp * s_stride + nc * S_ROW + s_ld_col;
      cp_async16(sh + L::SM_S + stage * S_STAGE + tid, p.scales + off);
      if (has_zp) cp_async16(sh + L::SM_Z + stage * S_STAGE + tid, p.zeros + off);
    }
    b_next += b_tile_stride;
    ++kt_next;
  };
  // Rows >= M are not loaded at all: their garbage only reaches accumulator rows that are never written
  // out. Chunks beyond K in valid rows are zero-filled (they are summed). By cp.async, or by plain loads
  // (async false: the prologue of an early-launched block, start_pipeline).
  auto fetch_act = [&](int stage, bool async) {
    int4* sa = sh + L::SM_A + stage * A_STAGE + a_sh_wr;
    const bool k_ok = a_chunk_next < kchunks;
#pragma unroll
    for (int it = 0; it < A_ITERS; ++it) {
      if (!a_row_ok[it]) continue;
      if (async)
        cp_async16_zfill(sa + it * kThreads, k_ok ? a_next + it * a_it_stride : p.a, k_ok);
      else
        sa[it * kThreads] = k_ok ? __ldcg(a_next + it * a_it_stride) : make_int4(0, 0, 0, 0);
    }
    a_next += A_ROW;
    a_chunk_next += A_ROW;
  };
  auto fetch = [&](int stage, bool pred) {
    if (pred) {
      fetch_act(stage, true);
      fetch_weights(stage);
    }
    cp_async_commit();  // also when idle, so that wait_group counts stay aligned
  };

  auto wait_stage = [&]() {
    cp_async_wait<ST - 2>();
    __syncthreads();
  };

  // ---- registers: double-buffered fragments, accumulators
  uint32_t fa[2][MB][4];
  uint32_t fb[2][4];
  uint32_t fs[2][4];
  uint32_t fz[2][4];
  float acc[MB][4][2][4];

  // Symmetric weights: the zero registers hold magic + 8 for good (nothing loads them).
#pragma unroll
  for (int b = 0; b < 2; ++b)
#pragma unroll
    for (int j = 0; j < 4; ++j) fz[b][j] = D::kSymZero2;

  auto load_regs = [&](int buf, int stage, int s) {
    const int4* sa = sh + L::SM_A + stage * A_STAGE + a_sh_rd[s];
#pragma unroll
    for (int i = 0; i < MB; ++i) ldmatrix_x4(fa[buf][i], sa + i * 16 * A_ROW);
    const uint32_t* sb = reinterpret_cast<const uint32_t*>(sh + L::SM_B + stage * B_STAGE + s * KW * B_KROW) + b_sh_rd;
#pragma unroll
    for (int j = 0; j < 4; ++j) fb[buf][j] = sb[32 * j];
    if (s > 0 && scales_per_tile) {  // same scale row as the previous k-block (held in the other buffer)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        fs[buf][j] = fs[buf ^ 1][j];
        fz[buf][j] = fz[buf ^ 1][j];
      }
      return;
    }
    ldmatrix_x4_trans(fs[buf], reinterpret_cast<const uint16_t*>(sh + L::SM_S + stage * S_STAGE) + s_sh_rd[s]);
    if (has_zp)
      ldmatrix_x4_trans(fz[buf], reinterpret_cast<const uint16_t*>(sh + L::SM_Z + stage * S_STAGE) + s_sh_rd[s]);
  };

  auto compute = [&](int buf) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t q = fb[buf][j];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // scale / zero of column 16 j + 8 h + g: half h of word j
        const uint32_t z = fz[buf][j], sc = fs[buf][j];
        const uint32_t b0 = h ? dequant2<T, 1>(q >> 4, z, sc) : dequant2<T, 0>(q, z, sc);    // k = 2t, 2t+1
        const uint32_t b1 = h ? dequant2<T, 1>(q >> 12, z, sc) : dequant2<T, 0>(q >> 8, z, sc);  // k = 2t+8, 2t+9
#pragma unroll
        for (int i = 0; i < MB; ++i) D::mma(fa[buf][i], b0, b1, acc[i][j][h]);
      }
    }
  };

  // A block launched early (programmatic dependent launch, see launch_one) runs while the previous kernel
  // still finishes: its first slice requests the prologue's weights at once, and only then waits for that
  // kernel, before it reads the activations (plain loads: the weights' commit groups are already counted)
  // or touches the workspace.
  auto start_pipeline = [&](bool first) {
    if (first && p.early) {
#pragma unroll
      for (int st = 0; st < ST - 1; ++st) {
        if (st < slice_iters) fetch_weights(st);
        cp_async_commit();
      }
      grid_dependency_wait();
#pragma unroll
      for (int st = 0; st < ST - 1; ++st)
        if (st < slice_iters) fetch_act(st, false);
    } else {
#pragma unroll
      for (int st = 0; st < ST - 1; ++st) fetch(st, st < slice_iters);
    }
#pragma unroll
    for (int i = 0; i < MB; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[i][j][h][e] = 0.f;
    wait_stage();
    load_regs(0, 0, 0);
  };

  // Slot of block b's partial for column `col`: 2 b for its first slice, 2 b + 1 for its last one (a stripe
  // has at most two partial slices; the columns in between it covers alone).
  auto part_slot = [&](int b, int col) -> float* {
    const int b_first_col = (b * iters) / k_tiles;
    return p.partials + static_cast<int64_t>(2 * b + (col == b_first_col ? 0 : 1)) * L::PART_FLOATS;
  };

  // ---- end of a slice: sum the k-warps in shared memory; a column computed by one block is written out
  // directly, otherwise every block stores its fp32 partial and the last one to arrive sums all partials in
  // the fixed order of their k-ranges (deterministic) and writes the result.
  auto finish_slice = [&]() {
    cp_async_wait<0>();
    __syncthreads();  // the pipeline buffers become the reduction buffer
    float* red = reinterpret_cast<float*>(sh);
    const bool split = first_blk != last_blk;
    float* my_part = split ? part_slot(blockIdx.x, slice_col) : nullptr;
    const uint16_t* bias = p.bias;
    auto write_out = [&](int row, int col, float (&v)[8]) {
      if (bias != nullptr) {
        const int4 bv = __ldg(reinterpret_cast<const int4*>(bias + col));
        const uint16_t* pb = reinterpret_cast<const uint16_t*>(&bv);
#pragma unroll
        for (int q = 0; q < 8; ++q) v[q] += D::to_float(pb[q]);
      }
      int4 out;
      uint16_t* po = reinterpret_cast<uint16_t*>(&out);
#pragma unroll
      for (int q = 0; q < 8; ++q) po[q] = D::from_float(v[q]);
      *reinterpret_cast<int4*>(c_prob + static_cast<int64_t>(row) * p.size_n + col) = out;
    };
#pragma unroll
    for (int i = 0; i < MB; ++i) {
      if (16 * i < rows_valid) {
        float* mine = red + kwi * 16 * RS;
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int col = nw * 64 + 16 * j + 8 * h + 2 * t4;
            *reinterpret_cast<float2*>(mine + g * RS + col) = make_float2(acc[i][j][h][0], acc[i][j][h][1]);
            *reinterpret_cast<float2*>(mine + (g + 8) * RS + col) = make_float2(acc[i][j][h][2], acc[i][j][h][3]);
          }
        __syncthreads();
        const int rows = min(16, rows_valid - 16 * i);
        for (int e = tid; e < rows * (TN / 8); e += kThreads) {
          const int r = e / (TN / 8), c8 = e % (TN / 8);
          const int col = nc * TN + c8 * 8;
          if (col < p.size_n) {
            float v[8];
#pragma unroll
            for (int q = 0; q < 8; ++q) v[q] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KW; ++kk) {
              const float4* src = reinterpret_cast<const float4*>(red + kk * 16 * RS + r * RS + c8 * 8);
              add8(v, src[0], src[1]);
            }
            if (split) {
              float4* dst = reinterpret_cast<float4*>(my_part + (16 * i + r) * TN + c8 * 8);
              __stcg(dst, make_float4(v[0], v[1], v[2], v[3]));
              __stcg(dst + 1, make_float4(v[4], v[5], v[6], v[7]));
            } else {
              write_out(16 * i + r, col, v);
            }
          }
        }
        __syncthreads();
      }
    }
    if (!split) return;
    if (!arrives_last(p.counters + slice_col, last_blk - first_blk + 1)) return;
    for (int e = tid; e < rows_valid * (TN / 8); e += kThreads) {
      const int r = e / (TN / 8), c8 = e % (TN / 8);
      const int col = nc * TN + c8 * 8;
      if (col < p.size_n) {
        float v[8];
#pragma unroll
        for (int q = 0; q < 8; ++q) v[q] = 0.f;
        for (int b = last_blk; b >= first_blk; --b) {  // bottom (last k-range) first, always the same order
          const float4* src = reinterpret_cast<const float4*>(part_slot(b, slice_col) + r * TN + c8 * 8);
          add8(v, __ldcg(src), __ldcg(src + 1));
        }
        write_out(r, col, v);
      }
    }
    if (tid == 0) p.counters[slice_col] = 0;  // every block of the column has arrived: leave it zero
    __syncthreads();  // before the next slice's prologue reuses shared memory
  };

  // ---- main loop
  init_slice();
  start_pipeline(true);
  int done = 0;  // tiles of the current slice consumed
  while (true) {
#pragma unroll
    for (int pipe = 0; pipe < ST; ++pipe) {
#pragma unroll
      for (int s = 0; s < SUB; ++s) {
        if (s == SUB - 1) {
          // refill the stage consumed last round, then make sure the next tile has landed
          fetch((pipe + ST - 1) % ST, done + ST - 1 < slice_iters);
          wait_stage();
        }
        const int u = pipe * SUB + s;
        load_regs((u + 1) & 1, s + 1 < SUB ? pipe : (pipe + 1) % ST, (s + 1) % SUB);
        compute(u & 1);
      }
      ++done;
      if (done == slice_iters) break;
    }
    if (done == slice_iters) {
      // the stripe's loads are all done: the next kernel may launch and fetch its weights during our tail
      if (tile + slice_iters >= tile_end) launch_dependents();
      finish_slice();
      tile += slice_iters;
      if (tile >= tile_end) break;
      init_slice();
      start_pipeline(false);
      done = 0;
    }
  }
}

// ------------------------------------------------------------------------------------ host side

struct TileCfg {
  int tn, tk;
};

constexpr TileCfg kCfgs[] = {{128, 128}, {256, 64}, {128, 64}};

template <int TN, int TK>
inline int smem_bytes(int mb) {
  switch (mb) {
    case 1: return Tile<1, TN, TK>::SMEM_BYTES;
    case 2: return Tile<2, TN, TK>::SMEM_BYTES;
    case 3: return Tile<3, TN, TK>::SMEM_BYTES;
    default: return Tile<4, TN, TK>::SMEM_BYTES;
  }
}

inline int smem_bytes_cfg(TileCfg c, int mb) {
  if (c.tn == 128 && c.tk == 128) return smem_bytes<128, 128>(mb);
  if (c.tn == 256 && c.tk == 64) return smem_bytes<256, 64>(mb);
  return smem_bytes<128, 64>(mb);
}

struct DeviceInfo {
  int sms = 0;
  int max_smem = 0;    // per block, opt-in
  bool early = false;  // sm_90+ and early_launch_enabled(): calls of up to 16 rows may launch early
  int early_smem = 0;  // > 0: the tiled kernel's early single-m-block launches take this much shared memory (launch_one)
};

inline const char* device_info(int device, DeviceInfo* out) {
  static DeviceInfo cache[64];
  if (device < 0 || device >= 64) return "hf_int4: device index out of range";
  DeviceInfo& d = cache[device];
  if (d.sms == 0) {
    int sms = 0, smem = 0, sm_smem = 0, major = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sm_smem, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess)
      return "hf_int4: cudaDeviceGetAttribute failed";
    d.max_smem = smem;
    const int half_sm = sm_smem / 2 + 1024;  // more than half an SM: one block per SM
    d.early = early_launch_enabled() && major >= 9;
    d.early_smem = d.early && half_sm <= smem ? half_sm : 0;
    d.sms = sms;
  }
  *out = d;
  return nullptr;
}

inline bool cfg_valid(TileCfg c, int mb, const Int4GemmArgs& a, int max_smem) {
  if (a.n_pad % c.tn != 0 || a.k_pad % c.tk != 0) return false;
  const int gs = a.group_size;  // a power of two >= 16, or k_pad (one group)
  if (!(gs % c.tk == 0 || c.tk % gs == 0)) return false;
  return smem_bytes_cfg(c, mb) + 64 <= max_smem;  // + the static flag of arrives_last
}

// Tile choice: small batches favour more, thinner column slices (better spread over the SMs);
// larger batches favour wide tiles (fewer A reloads).
inline const char* pick_cfg(int mb, bool many_problems, const Int4GemmArgs& a, int max_smem, TileCfg* out) {
  if (a.thread_n > 0 || a.thread_k > 0) {
    for (const TileCfg& c : kCfgs) {
      if ((a.thread_n <= 0 || c.tn == a.thread_n) && (a.thread_k <= 0 || c.tk == a.thread_k) &&
          cfg_valid(c, mb, a, max_smem)) {
        *out = c;
        return nullptr;
      }
    }
    return "hf_int4: the requested thread_n/thread_k tile is not available for this shape "
           "(tiles: 128x128, 256x64, 128x64 (thread_n x thread_k); thread_n must divide the padded N, "
           "thread_k the padded K, and the group size must be a multiple or divisor of thread_k)";
  }
  // Measured on H100 (scripts/sweep_grid.py, hf_int4.bench): for one problem of up to 64 rows, 256-wide
  // tiles win on wide layers (N = 8192, 28672) but leave too few column slices on N <= 4096, where
  // 128 x 128 is up to 1.3x faster; with several 64-row problems per launch 256-wide tiles win everywhere.
  static const TileCfg small_pref[] = {{128, 128}, {128, 64}, {256, 64}};
  static const TileCfg large_pref[] = {{256, 64}, {128, 128}, {128, 64}};
  const TileCfg* pref = mb == 1 || (!many_problems && a.n_pad <= 4096) ? small_pref : large_pref;
  for (int i = 0; i < 3; ++i) {
    if (cfg_valid(pref[i], mb, a, max_smem)) {
      *out = pref[i];
      return nullptr;
    }
  }
  return "hf_int4: no int4 GEMM tile fits this shape / group size / shared memory";
}

// Grid: `forced_blocks` when given (tests, tuning), else one block per SM (measured on H100: 2-4 blocks per
// SM were no faster, up to 50% slower), never more than the tiles or the workspace's partial slots (two per block).
//
// Single-m-block launches (M <= 16) are launched early behind a preceding int4 GEMM (programmatic stream
// serialization: they start when it triggers launch_dependents, and wait for its completion only before
// reading activations), which hides part of the launch and pipeline fill: 0.2-8.7% faster at M = 1..16 on
// H200, most on small layers (docs/kernel_notes.md step 11). Larger m-blocks are not launched early (an H100
// measurement found M = 64 4% slower). Early blocks get more than half an SM's shared memory so that they
// cannot pile up two per SM (measured 25% slower on H100).
template <typename T, int MB, int TN, int TK>
inline const char* launch_one(KernelParams kp, const DeviceInfo& info, int forced_blocks, int64_t total,
                              int64_t slot_pairs, int device, cudaStream_t stream) {
  auto kernel = int4_gemm_kernel<T, MB, TN, TK>;
  const bool early = MB == 1 && info.early_smem > 0;
  kp.early = early;
  const int smem = early ? cmax(Tile<MB, TN, TK>::SMEM_BYTES, info.early_smem) : Tile<MB, TN, TK>::SMEM_BYTES;
  static bool attr_set[64] = {};
  if (!attr_set[device]) {
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess)
      return "hf_int4: cudaFuncSetAttribute(MaxDynamicSharedMemorySize) failed";
    attr_set[device] = true;
  }
  const int64_t want = forced_blocks > 0 ? forced_blocks : info.sms;
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({want, total, slot_pairs})));
  if (launch_maybe_early(kernel, dim3(blocks), dim3(kThreads), smem, stream, early, kp) != cudaSuccess)
    return "hf_int4: launching the int4 GEMM kernel failed";
  return nullptr;
}

template <typename T, int TN, int TK>
inline const char* launch_mb(int mb, const KernelParams& kp, const DeviceInfo& info, int forced_blocks, int64_t total,
                             int64_t slot_pairs, int device, cudaStream_t stream) {
  switch (mb) {
    case 1: return launch_one<T, 1, TN, TK>(kp, info, forced_blocks, total, slot_pairs, device, stream);
    case 2: return launch_one<T, 2, TN, TK>(kp, info, forced_blocks, total, slot_pairs, device, stream);
    case 3: return launch_one<T, 3, TN, TK>(kp, info, forced_blocks, total, slot_pairs, device, stream);
    case 4: return launch_one<T, 4, TN, TK>(kp, info, forced_blocks, total, slot_pairs, device, stream);
    default: return "hf_int4: internal error (m blocks)";
  }
}

template <typename T>
const char* run_int4_gemm(const Int4GemmArgs& a) {
  if (a.m <= 0) return nullptr;
  DeviceInfo info;
  if (const char* err = device_info(a.device, &info)) return err;
  const bool one_group = a.group_size >= a.k_pad;
  if (!one_group && (a.group_size < 16 || (a.group_size & (a.group_size - 1)) != 0))
    return "hf_int4: the group size must be -1 or a power of two >= 16 (hf_int4.packing re-expresses others)";
  int group_shift = 31;
  if (!one_group)
    for (group_shift = 4; (1 << group_shift) < a.group_size; ++group_shift) {
    }
  const auto* A = static_cast<const uint16_t*>(a.a);
  auto* C = static_cast<uint16_t*>(a.c);
  if (a.up_offset > 0 && a.m > stream::kMaxRows) return "hf_int4: internal error (gated input of more than 8 rows)";
  const int lda = a.up_offset > 0 ? a.lda : a.size_k;
  if (a.workspace_size < kCounterInts) return "hf_int4: the workspace is smaller than its counter block";
  int rows_done = 0;
  while (rows_done < a.m) {
    const int rem = a.m - rows_done;
    if (rem <= stream::kMaxRows) {  // decode-sized block (or the last few rows): the streaming kernel
      return stream::run_stream_gemm<T>(a, A + static_cast<int64_t>(rows_done) * lda, lda,
                                        C + static_cast<int64_t>(rows_done) * a.size_n, rem, group_shift, info.sms,
                                        info.early);
    }
    int mb, par;
    if (rem > 64) {
      mb = 4;
      par = rem / 64;
    } else {
      mb = ceil_div(rem, 16);
      par = 1;
    }
    TileCfg cfg;
    if (const char* err = pick_cfg(mb, rem > 64, a, info.max_smem, &cfg)) return err;
    const int n_tiles = a.n_pad / cfg.tn;
    const int par_ws = kCounterInts / n_tiles;
    if (par_ws < 1) return "hf_int4: N is too large for the workspace counters";
    par = std::min({par, kMaxPar, par_ws});
    const int rows = std::min(rem, par * 16 * mb);

    KernelParams kp;
    kp.a = reinterpret_cast<const int4*>(A + static_cast<int64_t>(rows_done) * a.size_k);
    kp.b = static_cast<const int4*>(a.b);
    kp.scales = static_cast<const int4*>(a.scales);
    kp.zeros = static_cast<const int4*>(a.zeros);
    kp.bias = static_cast<const uint16_t*>(a.bias);
    kp.c = C + static_cast<int64_t>(rows_done) * a.size_n;
    kp.counters = a.workspace;
    kp.partials = reinterpret_cast<float*>(a.workspace + kCounterInts);
    kp.m = rows;
    kp.par = par;
    kp.size_n = a.size_n;
    kp.size_k = a.size_k;
    kp.n_pad = a.n_pad;
    kp.k_pad = a.k_pad;
    kp.group_shift = group_shift;  // kp.early: launch_one decides
    const int64_t total = int64_t(a.k_pad / cfg.tk) * n_tiles * par;
    // every block needs two partial slots (a single block never splits a column)
    const int64_t slot_pairs = (a.workspace_size - kCounterInts) / (16 * mb * cfg.tn) / 2;
    const char* err;
    if (cfg.tn == 128 && cfg.tk == 128)
      err = launch_mb<T, 128, 128>(mb, kp, info, a.sms, total, slot_pairs, a.device, a.stream);
    else if (cfg.tn == 256 && cfg.tk == 64)
      err = launch_mb<T, 256, 64>(mb, kp, info, a.sms, total, slot_pairs, a.device, a.stream);
    else
      err = launch_mb<T, 128, 64>(mb, kp, info, a.sms, total, slot_pairs, a.device, a.stream);
    if (err) return err;
    rows_done += rows;
  }
  return nullptr;
}

}  // namespace gemm
}  // namespace hf_int4
