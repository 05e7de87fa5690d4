// Small-M int4 GEMM (up to 8 rows: decode), C[M, N] = A[M, K] @ dequant(W)[K, N], built to stream the
// weights at HBM bandwidth. decode_gemm.cuh's run_int4_gemm sends every block of at most kMaxRows rows here.
//
// Why not the tiled kernel: at small M its cp.async -> shared -> ldmatrix pipeline with a block barrier per
// tile is latency-bound (docs/kernel_notes.md: 0.45 issued warps per scheduler, 2.4 of 4.4 TB/s on H200).
// Here each lane loads its own word of each 16 x 16 atom straight from global memory into registers, DEPTH
// k-blocks ahead, with no shared memory and no barrier until the end. The packed layout (kernels.h) makes word
// `lane` of an atom exactly the lane's A fragment of W^T for mma.m16n8k16 ("swap AB": the weights are A and
// the activations B, so one mma covers 16 columns x 8 rows of M).
//
// Work split: a CTA (WARPS warps) owns WN x WA atoms (16 WN WA columns) and one of `splits` equal k-ranges; its
// warps form WN groups of WARPS / WN, each group on its own WA atoms, and a group's warps take chunks of CKB k-blocks
// round-robin, so the CTAs sweep K together and the GPU reads bands of consecutive rows. choose_grid picks 16-warp
// CTAs over the whole of K, one per SM, or two 8-warp CTAs per SM with k-splits.
// A chunk lies in one group: its raw products are accumulated in fp32, then the zeros are subtracted and the
// scale applied once per chunk (RawFrag). The warps are summed in shared memory in a fixed order; with
// splits > 1 each CTA stores its fp32 partial in the workspace and the last CTA of a column tile to arrive sums
// the partials in split order (deterministic) and leaves the counter zero.
//
// Early launch (sm_90, programmatic dependent launch): the prologue requests the first DEPTH k-blocks of
// weights and scales, then waits for the previous kernel before it reads activations or the workspace.
//
// Gated input (GATED, a gated MLP's down projection): A holds the gate and up projections side by side and the
// GEMM's input is silu(gate) * up, formed as each step consumes its activations, so that the MLP needs no kernel
// between its two GEMMs (H100, 14336 x 4096: 0.5-2 us less a call than that kernel plus the GEMM; with PDL, which
// overlaps that kernel with its neighbours, ~0.5 us a layer of a batch-1 decode step).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "gemm_common.cuh"
#include "kernels.h"

namespace hf_int4 {
namespace gemm {
namespace stream {

constexpr int kMaxRows = kStreamMaxRows;  // one n8 block of the mma
// Warps per CTA: 16 (one CTA per SM: 16 warps of at most 128 registers fill the register file) or 8 (two per SM)
constexpr int kWideWarps = 16, kNarrowWarps = 8;
// 16 x 16 atoms per warp per k-block, at most: 4 (one 512-byte run per warp and k-block; 2 is slower unless it
// is what fills the SMs, see choose_grid), 2 for chunks of 1-2 k-blocks (groups of 16-32 rows), where 4 spills at
// 128 registers.
__host__ __device__ constexpr int atoms_for(int ckb) { return ckb >= 4 ? 4 : 2; }
// k-blocks of weights in flight per warp. 4 against 8: up to 12% faster at M = 1 on smaller layers (up to 3% slower on
// the largest) and 5-17% faster at M = 8; 2 is slower than both (kernel notes step 21).
constexpr int kDepth = 4;
constexpr int kPartFloats = kMaxRows * 16 * 4;  // a CTA's partial slot in the workspace (the widest CTA)

// Activations of rows past M: their loads read zeros here (no predicate per load). Large enough for a
// chunk's offsets (16 (CKB - 1) + 10 halves).
static __device__ uint32_t g_zero_acts[80];

struct Params {
  const uint16_t* a;       // [m, lda]: the activations in columns [0, size_k) (gated: the gate), 4-byte aligned rows
  int lda;                 // row stride of a, in elements (even)
  int up_offset;           // gated: the up projection's first column in a (even); else 0
  const uint32_t* b;       // packed weight [kb_total, n_pad * 2]
  const uint16_t* scales;  // [G_pad, n_pad]
  const uint16_t* zeros;   // [G_pad, n_pad] (magic + z); nullptr: symmetric
  const uint16_t* bias;    // [size_n] or nullptr
  uint16_t* c;             // [m, size_n]
  int* counters;           // per column tile, zero between launches
  float* partials;         // one kPartFloats slot per CTA (splits > 1)
  int m, size_n, size_k, n_pad, kb_total;
  int group_shift;         // log2(group size); 31 for one group
  int splits;              // k-ranges per column tile
  int chunks;              // ceil(kb_total / CKB)
};

// The A fragment of W^T (rows n = g, g + 8; k pairs 2t, 2t + 8) from the lane's packed word, raw: each value is
// magic + unit * q, exact. The zeros are subtracted per chunk in fp32, part - (magic + unit z) * sum(x), which
// saves an hsub2 per weight pair. fp16 takes rows g from nibble bits 0-3 (unit 1) and rows g + 8 from bits 4-7
// (unit 16): one shift per word instead of three (2-6% faster at M = 1, kernel notes step 12). The offset that
// cancels is then 1032 units on rows g (64.5 on rows g + 8), which costs about 2^-23 * 1032 of a term's size in
// the fp32 sums, far below fp16 rounding. bf16 has both rows at bits 0-3 (offset 136).
template <typename T>
struct RawFrag;
template <>
struct RawFrag<__half> {
  static constexpr float kMagic = 1024.f;
  __device__ static constexpr float unit(int row_half) { return row_half ? 16.f : 1.f; }
  __device__ static __forceinline__ void decode(uint32_t w, uint32_t (&f)[4]) {
    f[0] = raw_pair<Act<__half>::kMagic2, 0>(w);       // slots 0, 4: row g, k 2t, 2t + 1
    f[1] = raw_pair<Act<__half>::kMagic2, 4>(w);       // slots 1, 5: row g + 8
    f[2] = raw_pair<Act<__half>::kMagic2, 0>(w >> 8);  // slots 2, 6: row g, k 2t + 8, 2t + 9
    f[3] = raw_pair<Act<__half>::kMagic2, 4>(w >> 8);  // slots 3, 7: row g + 8
  }
};
template <>
struct RawFrag<__nv_bfloat16> {
  static constexpr float kMagic = 128.f;
  __device__ static constexpr float unit(int) { return 1.f; }
  __device__ static __forceinline__ void decode(uint32_t w, uint32_t (&f)[4]) {
    f[0] = raw_pair<Act<__nv_bfloat16>::kMagic2>(w);
    f[1] = raw_pair<Act<__nv_bfloat16>::kMagic2>(w >> 4);
    f[2] = raw_pair<Act<__nv_bfloat16>::kMagic2>(w >> 8);
    f[3] = raw_pair<Act<__nv_bfloat16>::kMagic2>(w >> 12);
  }
};

// WN > 1: splits == 1 only (a CTA's partial slot holds kPartFloats).
template <typename T, int CKB, int WARPS, int WA, int WN, bool GATED>
__global__ void __launch_bounds__(32 * WARPS, kWideWarps / WARPS) stream_gemm_kernel(const Params p) {
  using D = Act<T>;
  using R = RawFrag<T>;
  constexpr int U = cmax(kDepth, CKB);  // steps per unrolled round: whole chunks and whole rings
  constexpr int WK = WARPS / WN;        // warps of a group, along K
  constexpr int WCOLS = 16 * WA, COLS = WN * WCOLS, kThreads = 32 * WARPS;  // a group's columns, the CTA's
  static_assert(U % kDepth == 0 && U % CKB == 0, "ring slots and chunk positions must repeat every round");
  static_assert(WA <= atoms_for(CKB), "more atoms than registers allow");
  static_assert(WARPS % WN == 0, "whole groups of warps");
  __shared__ float red[WARPS][kMaxRows][WCOLS + 4];  // + 4: conflict-free fragment writes

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warp_n = WN == 1 ? 0 : warp / WK, warp_k = WN == 1 ? warp : warp % WK;  // group, place in it
  const int g = lane >> 2, t = lane & 3;
  const int col_tiles = p.n_pad / COLS;
  const int split = blockIdx.x / col_tiles, tile = blockIdx.x - split * col_tiles;
  const int col0 = tile * COLS, wcol0 = col0 + warp_n * WCOLS;  // the CTA's first column, the group's
  const int c_begin = static_cast<int>(static_cast<int64_t>(split) * p.chunks / p.splits);
  const int c_end = static_cast<int>(static_cast<int64_t>(split + 1) * p.chunks / p.splits);
  const int my_chunks = c_end - c_begin > warp_k ? ceil_div(c_end - c_begin - warp_k, WK) : 0;
  const int row_words = 2 * p.n_pad, row_bytes = 4 * row_words;  // 32-bit: an address is one IMAD.WIDE
  const uint32_t* b_lane = p.b + 2 * wcol0 + lane;  // word of atom a in k-block kb: + kb * row_words + 32 a
  const bool has_zp = p.zeros != nullptr;
  // Scales / zeros of column wcol0 + g; a group's row is a 32-bit offset from here (the host checks that it fits),
  // so a chunk's 8 loads share one address computation instead of 64-bit math per load.
  const uint16_t* s_lane = p.scales + wcol0 + g;
  const uint16_t* z_lane = has_zp ? p.zeros + wcol0 + g : nullptr;
  // x[g][k + 2t]; rows past M read zeros (g_zero_acts)
  const uint16_t* x_row = g < p.m ? p.a + static_cast<int64_t>(g) * p.lda + 2 * t : nullptr;
  // gated: the up projection's word lies this many words after the gate's (rows past M: 0, the zeros again)
  const int up_words = GATED && x_row != nullptr ? p.up_offset / 2 : 0;

  // The load stream runs kDepth steps ahead of the compute. Step j of this warp is k-block j % CKB of its chunk
  // j / CKB, which is chunk c_begin + warp_k + WK (j / CKB) of K. Addresses are set up once per chunk.
  const uint32_t* w_chunk;  // the lane's word of atom 0 in the chunk's first k-block
  const uint16_t* x_chunk;  // x[g][chunk's first k + 2t]
  int k_valid;              // size_k - (chunk's first k + 2t): activation pairs at offsets < k_valid exist
  bool w_valid;             // the chunk is one of the warp's (else its weights are not loaded)

  // Rings, by step: weights and activations step % kDepth; scales and zeros step % U, at chunk starts only.
  uint32_t wr[kDepth][WA];  // the lane's packed word of each atom
  uint32_t xr[kDepth][2];   // B fragments: x[g][k0 + 2t, +1] and [k0 + 2t + 8, +9] (gated: of the gate)
  uint32_t ur[GATED ? kDepth : 1][2];  // gated: the same words of the up projection
  uint32_t sr[U][WA];       // scales of columns 16 a + g (low half) and 16 a + 8 + g (high)
  uint32_t zr[U][WA];       // zeros likewise (asymmetric only)

  // A chunk past the warp's last (the tail of the last round) loads no weights: its steps compute on the ring's
  // stale words (any word decodes to finite values) with zero activations and zero scales, adding nothing.
  // Chunks are whole: the host picks CKB to divide kb_total.
  auto load_chunk = [&](int lc, int q, bool weights) {  // the warp's chunk lc, first step at round position q
    const bool ok = lc < my_chunks;
    const int kb = ok ? (c_begin + warp_k + WK * lc) * CKB : 0;
    k_valid = ok ? p.size_k - kb * 16 - 2 * t : 0;
    w_valid = ok;
    w_chunk = b_lane + static_cast<int64_t>(kb) * row_words;
    x_chunk = x_row != nullptr ? x_row + kb * 16 : reinterpret_cast<const uint16_t*>(g_zero_acts);
    if (weights) {
      const uint16_t* s_row = s_lane + ((kb * 16) >> p.group_shift) * p.n_pad;
#pragma unroll
      for (int a = 0; a < WA; ++a) {
        sr[q][a] = ok ? uint32_t(__ldg(s_row + 16 * a)) | uint32_t(__ldg(s_row + 16 * a + 8)) << 16 : 0u;
        if (has_zp) {  // (symmetric: zr and zc stay unset and unread)
          const uint16_t* z_row = z_lane + (s_row - s_lane);
          zr[q][a] = uint32_t(__ldg(z_row + 16 * a)) | uint32_t(__ldg(z_row + 16 * a + 8)) << 16;
        }
      }
    }
  };
  // Weights and scales do not depend on the previous kernel. Activations may be its output: plain loads
  // (not the read-only path), issued only after grid_dependency_wait.
  auto load_weights = [&](int q) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(reinterpret_cast<const char*>(w_chunk) +
                                                          (q % CKB) * row_bytes);
#pragma unroll
    for (int a = 0; a < WA; ++a)
      if (w_valid) wr[q % kDepth][a] = __ldcs(w + 32 * a);
  };
  auto load_acts = [&](int q) {
    const int i = q % CKB;
    const uint32_t* x = reinterpret_cast<const uint32_t*>(x_chunk + 16 * i);
    xr[q % kDepth][0] = 16 * i < k_valid ? x[0] : 0u;
    xr[q % kDepth][1] = 16 * i + 8 < k_valid ? x[4] : 0u;
    if constexpr (GATED) {
      ur[q % kDepth][0] = 16 * i < k_valid ? x[up_words] : 0u;
      ur[q % kDepth][1] = 16 * i + 8 < k_valid ? x[up_words + 4] : 0u;
    }
  };

#pragma unroll
  for (int u = 0; u < kDepth; ++u)
#pragma unroll
    for (int a = 0; a < WA; ++a) wr[u][a] = 0u;  // a warp without chunks computes on these
  float acc[WA][4];
  float part[WA][4];       // the current chunk's raw sums: sum (magic + unit q) x
  float xl = 0.f;          // the lane's sum of its activations (row g) in the current chunk
  float xs[2];             // the chunk's sum of x of rows 2t, 2t + 1 of M (C fragment columns)
  uint32_t sc[WA], zc[WA];  // the current chunk's scales / zeros (columns g, g + 8)
#pragma unroll
  for (int a = 0; a < WA; ++a)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[a][e] = 0.f;

#pragma unroll
  for (int q = 0; q < kDepth; ++q) {
    if (q % CKB == 0) load_chunk(q / CKB, q, true);
    load_weights(q);
  }
  grid_dependency_wait();
#pragma unroll
  for (int q = 0; q < kDepth; ++q) {
    if (q % CKB == 0) load_chunk(q / CKB, q, false);
    load_acts(q);
  }
  int next_chunk = ceil_div(kDepth, CKB);  // the warp's chunk that the load stream starts next

  // Steps past the warp's last (the end of its last round) compute on zero activations and zero scales.
  for (int j0 = 0; j0 < my_chunks * CKB; j0 += U) {
#pragma unroll
    for (int q = 0; q < U; ++q) {
      const int u = q % kDepth, i = q % CKB;  // ring slot, position in the chunk (constants after unrolling)
      uint32_t b0 = xr[u][0], b1 = xr[u][1];  // the step's B fragments
      if constexpr (GATED) {  // formed here, not at load time, so that the loads stay kDepth steps ahead
        b0 = silu_mul<T>(b0, ur[u][0]);
        b1 = silu_mul<T>(b1, ur[u][1]);
      }
      if (i == 0) {
#pragma unroll
        for (int a = 0; a < WA; ++a) {
          sc[a] = sr[q][a];
          zc[a] = zr[q][a];
        }
        xl = 0.f;
      }
      // sum(x) by fp32 adds and four shuffles per chunk rather than an mma with A = 1 per step (1-2% faster, kernel
      // notes step 22)
      xl += (D::to_float(b0 & 0xffff) + D::to_float(b0 >> 16)) + (D::to_float(b1 & 0xffff) + D::to_float(b1 >> 16));
      if (i == CKB - 1) {
        xl += __shfl_xor_sync(0xffffffffu, xl, 1);
        xl += __shfl_xor_sync(0xffffffffu, xl, 2);  // row g's sum, in lanes 4g .. 4g + 3
        xs[0] = __shfl_sync(0xffffffffu, xl, 8 * t);
        xs[1] = __shfl_sync(0xffffffffu, xl, 8 * t + 4);
      }
#pragma unroll
      for (int a = 0; a < WA; ++a) {
        uint32_t frag[4];
        R::decode(wr[u][a], frag);
        if (i == 0)
#pragma unroll
          for (int e = 0; e < 4; ++e) part[a][e] = 0.f;
        D::mma(frag, b0, b1, part[a]);
      }
      if (i == CKB - 1) {  // chunk end: acc += s / unit * (part - (magic + unit z) * sum(x))
#pragma unroll
        for (int a = 0; a < WA; ++a) {
          float s[2], zf[2];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            s[h] = D::to_float(static_cast<uint16_t>(sc[a] >> 16 * h)) * (1.f / R::unit(h));
            zf[h] = has_zp ? R::kMagic + R::unit(h) * (D::to_float(static_cast<uint16_t>(zc[a] >> 16 * h)) - R::kMagic)
                           : R::kMagic + R::unit(h) * 8.f;
          }
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[a][e] = fmaf(s[e >> 1], fmaf(-zf[e >> 1], xs[e & 1], part[a][e]), acc[a][e]);
        }
      }
      const int ql = (q + kDepth) % U;  // round position of the step loaded now
      if (ql % CKB == 0) load_chunk(next_chunk++, ql, true);
      load_weights(ql);
      load_acts(ql);
    }
  }
  // every load of this CTA is done: the next kernel may launch and fetch its weights during our tail
  launch_dependents();

  // ---- sum the warps (C fragment: row n = 16 a + g (+ 8 for e >= 2), column m = 2 t + (e & 1))
#pragma unroll
  for (int a = 0; a < WA; ++a)
#pragma unroll
    for (int e = 0; e < 4; ++e) red[warp][2 * t + (e & 1)][16 * a + g + 8 * (e >> 1)] = acc[a][e];
  __syncthreads();

  auto write_out = [&](int m, int n, float v) {
    const int col = col0 + n;
    if (col >= p.size_n) return;
    if (p.bias != nullptr) v += D::to_float(__ldg(p.bias + col));
    p.c[static_cast<int64_t>(m) * p.size_n + col] = D::from_float(v);
  };
  float* my_part = p.partials + static_cast<int64_t>(blockIdx.x) * kPartFloats;
  for (int o = threadIdx.x; o < p.m * COLS; o += kThreads) {
    const int m = o / COLS, n = o % COLS, wn = n / WCOLS;  // column n is group wn's column n % WCOLS
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < WK; ++w) v += red[wn * WK + w][m][n % WCOLS];
    if (p.splits == 1)
      write_out(m, n, v);
    else
      __stcg(my_part + o, v);
  }
  if (p.splits == 1) return;

  // ---- the last CTA of the column tile sums the partials in split order
  if (!arrives_last(p.counters + tile, p.splits)) return;
  for (int o = threadIdx.x; o < p.m * COLS; o += kThreads) {
    float v = 0.f;
    for (int s = 0; s < p.splits; ++s) v += __ldcg(p.partials + static_cast<int64_t>(s * col_tiles + tile) * kPartFloats + o);
    write_out(o / COLS, o % COLS, v);
  }
  if (threadIdx.x == 0) p.counters[tile] = 0;
}

// ------------------------------------------------------------------------------------ host side

// The grid, measured on H200 and H100 (decode probe, scripts/probe_sweep.sh; docs/kernel_notes.md steps 12 and 23):
// - When a layer has between half and all as many column tiles of 4 atoms as SMs: one 16-warp CTA per column tile
//   over the whole of K, one per SM, no k-split (M = 1: 4096x6144 7.37 -> 6.15 us, 8192^2 12.47 -> 11.08). Where
//   only 2-atom tiles fall in that range, the same with those if each warp has at most two chunks (4096^2: 5.07 ->
//   4.51 us; on 14336x4096, seven chunks per warp, the narrower tiles were up to 17% slower at M = 8), or at any
//   number of chunks if M = 1, where a warp's activation loads carry one row (H100, kernel notes step 44: 14336x4096
//   13.28 -> 12.51 us, 11008x4096 -2%, 8192x4096 -9%, 10240x2560 -10%, 18944x3584 +2%; at M = 2 mixed, -4% to +3%).
// - Otherwise two 8-warp CTAs per SM with k-splits: one wave of about two CTAs per SM is fastest (more, smaller CTAs
//   were 10-30% slower), and splits that give the warps unequal numbers of chunks are slow (3 splits of 64 chunks:
//   1.2x, of 32: 1.8x). So: a power of two, at most two CTAs per SM, at least half a chunk per warp (small layers).
// - Where the 4-atom tiles outnumber the SMs: 16-warp CTAs of wn = 2 or 4 groups of warps, each group on its own
//   4 atoms, if that makes the tiles number in (sms / 2, sms]: 4096x28672 (4 groups) 21.05 -> 19.42 us at M = 1,
//   22.75 -> 21.35 at M = 8, against 8-warp CTAs in 1.7 waves; 4096x14336 (2 groups) unchanged (10.76 us).
// - Where both 64- and 48-column tiles fall in (sms / 2, sms]: the 48-column ones (3 atoms), more CTAs over all of K:
//   4096x6144 gets 128 instead of 96, 6.14 -> 5.67 us at M = 1, 6.79 -> 6.65 at M = 8.
// m: the rows of the call. forced_splits > 0 (tests) forces the second kind with that many splits.
constexpr int kMaxGroups = 4;
struct Grid {
  int warps, atoms, splits, wn;  // wn: groups of warps along N (16-warp CTAs, no split)
};
inline Grid choose_grid(int n_pad, int chunks, int max_atoms, int sms, int forced_splits, int64_t partial_floats,
                        int m) {
  auto fills = [&](int cols) { return n_pad % cols == 0 && 2 * (n_pad / cols) > sms && n_pad / cols <= sms; };
  if (forced_splits <= 0) {
    if (max_atoms == 4 && fills(64) && fills(48)) return {kWideWarps, 3, 1, 1};  // more tiles, more SMs busy
    for (int atoms = max_atoms; atoms >= 2; atoms /= 2)
      if (fills(16 * atoms) && (atoms == max_atoms || chunks <= 2 * kWideWarps || m == 1))
        return {kWideWarps, atoms, 1, 1};
    for (int wn = 2; wn <= kMaxGroups; wn *= 2)
      if (n_pad / (16 * max_atoms) > sms && fills(16 * max_atoms * wn) && chunks >= kWideWarps / wn)
        return {kWideWarps, max_atoms, 1, wn};
  }
  const int col_tiles = n_pad / (16 * max_atoms);
  int s = 1;
  if (forced_splits > 0)
    s = std::min(forced_splits, chunks);
  else
    while (2 * s * col_tiles <= 2 * sms && chunks / (2 * s) >= kNarrowWarps / 2) s *= 2;
  while (s > 1 && int64_t(s) * col_tiles * kPartFloats > partial_floats) --s;  // one partial per CTA
  return {kNarrowWarps, max_atoms, s, 1};
}

template <typename T, int CKB, int WARPS, int WA, int WN = 1>
const char* launch_grid(const Params& p, int n_pad, cudaStream_t stream, bool early) {
  const auto kernel = p.up_offset > 0 ? stream_gemm_kernel<T, CKB, WARPS, WA, WN, true>
                                      : stream_gemm_kernel<T, CKB, WARPS, WA, WN, false>;
  if (launch_maybe_early(kernel, dim3(n_pad / (16 * WA * WN) * p.splits),
                         dim3(32 * WARPS), 0, stream, early, p) != cudaSuccess)
    return "hf_int4: launching the small-M int4 GEMM kernel failed";
  return nullptr;
}

template <typename T, int CKB>
const char* launch(Params p, const Int4GemmArgs& a, int sms, bool early) {
  constexpr int kAtoms = atoms_for(CKB);
  p.chunks = ceil_div(p.kb_total, CKB);
  const Grid g = choose_grid(a.n_pad, p.chunks, kAtoms, sms, a.sms, a.workspace_size - kCounterInts, p.m);
  p.splits = g.splits;
  if (g.warps == kNarrowWarps) return launch_grid<T, CKB, kNarrowWarps, kAtoms>(p, a.n_pad, a.stream, early);
  if (g.wn == 2) return launch_grid<T, CKB, kWideWarps, kAtoms, 2>(p, a.n_pad, a.stream, early);
  if (g.wn == 4) return launch_grid<T, CKB, kWideWarps, kAtoms, 4>(p, a.n_pad, a.stream, early);
  if (g.atoms == kAtoms) return launch_grid<T, CKB, kWideWarps, kAtoms>(p, a.n_pad, a.stream, early);
  if constexpr (kAtoms == 4)
    if (g.atoms == 3) return launch_grid<T, CKB, kWideWarps, 3>(p, a.n_pad, a.stream, early);
  return launch_grid<T, CKB, kWideWarps, 2>(p, a.n_pad, a.stream, early);
}

// m (<= kMaxRows) rows of A (row stride lda; a.up_offset > 0: gated) -> C. group_shift as in the tiled kernel; sms:
// the GPU's SM count; early: may launch early behind the previous kernel (sm_90+). a.sms > 0 forces 8-warp CTAs with
// that many k-splits (tests).
template <typename T>
const char* run_stream_gemm(const Int4GemmArgs& a, const uint16_t* A, int lda, uint16_t* C, int m, int group_shift,
                            int sms, bool early) {
  Params p;
  p.a = A;
  p.lda = lda;
  p.up_offset = a.up_offset;
  p.b = static_cast<const uint32_t*>(a.b);
  p.scales = static_cast<const uint16_t*>(a.scales);
  p.zeros = static_cast<const uint16_t*>(a.zeros);
  p.bias = static_cast<const uint16_t*>(a.bias);
  p.c = C;
  p.counters = a.workspace;
  p.partials = reinterpret_cast<float*>(a.workspace + kCounterInts);
  p.m = m;
  p.size_n = a.size_n;
  p.size_k = a.size_k;
  p.n_pad = a.n_pad;
  p.kb_total = a.k_pad / 16;
  p.group_shift = group_shift;
  const int64_t groups = group_shift >= 31 ? 1 : ((int64_t(p.kb_total) * 16 - 1) >> group_shift) + 1;
  if (groups * a.n_pad > INT32_MAX) return "hf_int4: the small-M int4 GEMM needs fewer than 2^31 scales per layer";
  // a chunk lies in one group (CKB * 16 rows divide the power-of-two group size) and chunks are whole (CKB divides
  // kb_total: no clamp per weight load; K_pad % 128 != 0, e.g. K = 576, runs shorter chunks)
  int ckb = group_shift >= 31 ? 8 : std::min(8, 1 << (group_shift - 4));
  while (p.kb_total % ckb != 0) ckb /= 2;
  switch (ckb) {
    case 1: return launch<T, 1>(p, a, sms, early);
    case 2: return launch<T, 2>(p, a, sms, early);
    case 4: return launch<T, 4>(p, a, sms, early);
    default: return launch<T, 8>(p, a, sms, early);
  }
}

}  // namespace stream
}  // namespace gemm
}  // namespace hf_int4
