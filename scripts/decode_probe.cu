// Standalone timing probe for the decode kernel (no torch): per-call time of run_int4_gemm<__half> and of a
// plain read of the same bytes, CUDA-graph replay over rotating weight copies (> 4x L2); with PROBE_READS=1 in the
// environment also six reads in other access orders. Exits 1 if the GEMM's result is wrong (check_against_reference).
//   nvcc -std=c++17 -O3 -arch=sm_90 -I hf_int4/csrc scripts/decode_probe.cu -o probe   (scripts/probe_sweep.sh)
//   ./probe K N M [thread_n thread_k] [blocks: the tiled kernel's thread blocks, or the streaming kernel's k-splits at M <= 8]
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include <cuda_fp16.h>

#include "decode_gemm.cuh"
#include "read_floor.cuh"

#define CK(x)                                                                      \
  do {                                                                             \
    cudaError_t e = (x);                                                           \
    if (e != cudaSuccess) {                                                        \
      printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e));             \
      exit(1);                                                                     \
    }                                                                              \
  } while (0)

// The GEMM's access order without its arithmetic: block b reads the weight tiles of its stripe (column-major
// (k-tile, n-tile) order, TN columns x 16 * TKB rows per tile, one TN * 8-byte run per 16-row k-block), DEPTH tiles in
// flight per thread. Tells a slow access pattern apart from a slow pipeline.
constexpr int kPatternThreads = 256;
template <int TN, int TKB, int DEPTH>
__global__ void pattern_read_kernel(const int4* b, int n_pad, int k_tiles, int n_tiles, int* sink) {
  constexpr int RUN = TN / 2, PER = TKB * RUN / kPatternThreads;  // int4 per k-block run, loads per thread per tile
  const int total = k_tiles * n_tiles, iters = (total + gridDim.x - 1) / gridDim.x;
  const int t0 = blockIdx.x * iters, t1 = min(total, t0 + iters);
  const int64_t row = n_pad / 2;
  int x = 0;
  for (int t = t0; t < t1; t += DEPTH) {
    int4 v[DEPTH][PER];
#pragma unroll
    for (int d = 0; d < DEPTH; ++d)
#pragma unroll
      for (int l = 0; l < PER; ++l) {
        const int tt = min(t + d, t1 - 1), e = threadIdx.x + l * kPatternThreads;
        const int col = tt / k_tiles, kt = tt % k_tiles;
        v[d][l] = __ldcs(b + (int64_t(kt) * TKB + e / RUN) * row + col * RUN + e % RUN);
      }
#pragma unroll
    for (int d = 0; d < DEPTH; ++d)
#pragma unroll
      for (int l = 0; l < PER; ++l) x ^= v[d][l].x ^ v[d][l].y ^ v[d][l].z ^ v[d][l].w;
  }
  if (x == 0x12345678) sink[0] = x;
}

// The streaming kernel's access order without its arithmetic, with RUN x 512-byte runs per warp and k-block: CTA
// (column tile, k-split), 8 warps on consecutive 8-k-block chunks of the split, a chunk's 8 k-blocks loaded at once. RUN = 1
// is the kernel's order (4 atoms per warp); RUN = 2, 4 ask whether longer contiguous runs read faster. WORDS: each
// 512-byte run read as the kernel reads it, 4 x 32-bit words per lane 128 bytes apart (one per atom), not one int4.
template <int RUN, bool WORDS = false>
__global__ void stream_order_read_kernel(const int4* b, int64_t row_int4, int kb_total, int col_tiles, int* sink) {
  constexpr int kCkb = 8;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int col = blockIdx.x % col_tiles, split = blockIdx.x / col_tiles, splits = gridDim.x / col_tiles;
  const int chunks = kb_total / kCkb, per_split = (chunks + splits - 1) / splits;
  const int c0 = split * per_split, c1 = min(chunks, c0 + per_split);
  uint32_t x = 0;
  for (int c = c0 + warp; c < c1; c += 8) {
    uint32_t v[kCkb][RUN][4];
#pragma unroll
    for (int i = 0; i < kCkb; ++i)
#pragma unroll
      for (int r = 0; r < RUN; ++r) {
        const int4* run = b + int64_t(c * kCkb + i) * row_int4 + (col * RUN + r) * 32;
        if constexpr (WORDS) {
#pragma unroll
          for (int a = 0; a < 4; ++a) v[i][r][a] = __ldcs(reinterpret_cast<const uint32_t*>(run) + 32 * a + lane);
        } else {
          const int4 q = __ldcs(run + lane);
          v[i][r][0] = q.x, v[i][r][1] = q.y, v[i][r][2] = q.z, v[i][r][3] = q.w;
        }
      }
#pragma unroll
    for (int i = 0; i < kCkb; ++i)
#pragma unroll
      for (int r = 0; r < RUN; ++r) x ^= v[i][r][0] ^ v[i][r][1] ^ v[i][r][2] ^ v[i][r][3];
  }
  if (x == 0x12345678) sink[0] = x;
}

template <typename F>
float time_graph(F&& launch_all, int calls, cudaStream_t s) {
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  launch_all();
  CK(cudaStreamEndCapture(s, &g));
  CK(cudaGraphInstantiate(&ge, g, 0));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  std::vector<float> ts;
  for (int r = 0; r < 9; ++r) {
    CK(cudaEventRecord(e0, s));
    CK(cudaGraphLaunch(ge, s));
    CK(cudaEventRecord(e1, s));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    ts.push_back(ms * 1000.f / calls);
  }
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

double half_bits(uint16_t h) { return double(__half2float(__ushort_as_half(h))); }  // an fp16's value

// The double-precision product of the first M (<= 16) rows of the activations with the weights decoded from the packed
// words on the host, by kernels.h's layout: word (kb, 32 a + lane), nibble slot i = 4 odd + 2 upper + h holds row
// k = 16 kb + 2 t + odd + 8 upper, column n = 16 a + 8 h + g (g = lane / 4, t = lane % 4) as a signed int4
// (symmetric: the zero point 8 is already off).
void compute_reference(const std::vector<int32_t>& hb, const std::vector<uint16_t>& hs, const std::vector<uint16_t>& ha,
                       int K, int N, int M, int gs, std::vector<double>& ref) {
  std::vector<double> x(int64_t(M) * K);
  for (size_t i = 0; i < x.size(); ++i) x[i] = half_bits(ha[i]);
  for (int kb = 0; kb < K / 16; ++kb)
    for (int col = 0; col < 2 * N; ++col) {
      const uint32_t word = uint32_t(hb[int64_t(kb) * 2 * N + col]);
      const int a = col / 32, lane = col % 32, g = lane / 4, t = lane % 4;
      for (int i = 0; i < 8; ++i) {
        const int q = int((word >> (4 * i)) & 15u), w = q >= 8 ? q - 16 : q;
        const int k = 16 * kb + 2 * t + (i >> 2) + 8 * ((i >> 1) & 1), n = 16 * a + 8 * (i & 1) + g;
        const double wv = w * half_bits(hs[int64_t(k / gs) * N + n]);
        for (int m = 0; m < M; ++m) ref[int64_t(m) * N + n] += x[int64_t(m) * K + k] * wv;
      }
    }
}

// Relative error (max |c - ref| / max |ref|) of the GEMM's output c [M, N], its first 16 rows (the streaming kernel's
// and the tiled kernel's first m-block; the host product of more costs seconds), against compute_reference.
// The data depend only on (K, N, M) (rand() unseeded), so the product is kept in `cache` (a file) for the next build's
// run of the same case: a sweep of several builds computes it once per case (probe_sweep.sh clears the files).
double check_against_reference(const std::vector<int32_t>& hb, const std::vector<uint16_t>& hs,
                               const std::vector<uint16_t>& ha, const uint16_t* c_dev, int K, int N, int M, int gs,
                               const char* cache) {
  M = std::min(M, 16);
  std::vector<uint16_t> hc(int64_t(M) * N);
  CK(cudaMemcpy(hc.data(), c_dev, hc.size() * 2, cudaMemcpyDeviceToHost));
  std::vector<double> ref(hc.size(), 0.0);
  FILE* in = fopen(cache, "rb");
  const bool cached = in != nullptr && fread(ref.data(), sizeof(double), ref.size(), in) == ref.size();
  if (in != nullptr) fclose(in);
  if (!cached) compute_reference(hb, hs, ha, K, N, M, gs, ref);
  if (FILE* out = cached ? nullptr : fopen(cache, "wb")) {
    fwrite(ref.data(), sizeof(double), ref.size(), out);
    fclose(out);
  }
  double max_ref = 0.0, max_err = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) {
    max_ref = std::max(max_ref, std::abs(ref[i]));
    max_err = std::max(max_err, std::abs(half_bits(hc[i]) - ref[i]));
  }
  return max_err / std::max(max_ref, 1e-30);
}

int main(int argc, char** argv) {
  const int K = atoi(argv[1]), N = atoi(argv[2]), M = atoi(argv[3]);
  const int tn = argc > 5 ? atoi(argv[4]) : -1, tk = argc > 5 ? atoi(argv[5]) : -1;
  const int blocks = argc > 6 ? atoi(argv[6]) : -1;
  const int gs = 128;
  const int64_t b_ints = int64_t(K / 16) * N * 2, s_halves = int64_t(K / gs) * N;
  int l2 = 0;
  CK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0));
  const int copies = int(std::max<int64_t>(8, 4 * int64_t(l2) / (b_ints * 4 + s_halves * 2) + 1));  // > 4x L2
  std::vector<int32_t> hb(b_ints);
  for (int64_t i = 0; i < b_ints; ++i) hb[i] = int32_t(rand()) ^ (rand() << 16);
  // Activations in quarters of -1..1 and scales 2^-7, 2^-8 or 3 * 2^-8: exact in fp16, so the check below sees only
  // the kernel's fp32 sums and its output rounding (the timings do not depend on the values).
  std::vector<uint16_t> hs(s_halves), ha(int64_t(M) * K);
  const uint16_t scale_bits[3] = {0x2000, 0x1c00, 0x1e00};
  for (auto& v : hs) v = scale_bits[rand() % 3];
  for (auto& v : ha) v = __half_as_ushort(__float2half(0.25f * float(rand() % 9 - 4)));
  int32_t* b;
  uint16_t *sc, *a, *c;
  int* ws;
  CK(cudaMalloc(&b, b_ints * 4 * copies));
  CK(cudaMalloc(&sc, s_halves * 2 * copies));
  for (int i = 0; i < copies; ++i) {
    CK(cudaMemcpy(b + i * b_ints, hb.data(), b_ints * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(sc + i * s_halves, hs.data(), s_halves * 2, cudaMemcpyHostToDevice));
  }
  CK(cudaMalloc(&a, ha.size() * 2));
  CK(cudaMemcpy(a, ha.data(), ha.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&c, int64_t(M) * N * 2));
  int sms;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int64_t ws_ints = hf_int4::int4_gemm_workspace_ints(std::max(sms, blocks) * 2);
  CK(cudaMalloc(&ws, ws_ints * 4));
  CK(cudaMemset(ws, 0, ws_ints * 4));
  int* sink;
  CK(cudaMalloc(&sink, 4 * sms * hf_int4::kReadFloorThreads * sizeof(int)));  // read_floor_kernel: one per thread
  cudaStream_t s;
  CK(cudaStreamCreate(&s));

  auto gemm = [&](int i) {
    hf_int4::Int4GemmArgs x;
    x.a = a; x.b = b + i * b_ints; x.scales = sc + i * s_halves; x.c = c;
    x.workspace = ws; x.workspace_size = ws_ints; x.m = M; x.size_n = N; x.size_k = K; x.n_pad = N; x.k_pad = K;
    x.group_size = gs; x.thread_n = tn; x.thread_k = tk; x.sms = blocks; x.stream = s;
    if (const char* err = hf_int4::gemm::run_int4_gemm<__half>(x)) { printf("%s\n", err); exit(1); }
  };
  const int calls = 4 * copies;
  for (int i = 0; i < 3; ++i) gemm(i);  // warm-up (also what ncu profiles with --launch-skip 2)
  CK(cudaStreamSynchronize(s));
  char cache[64];
  snprintf(cache, sizeof cache, "/tmp/probe_ref_%d_%d_%d", K, N, M);
  const double err = check_against_reference(hb, hs, ha, c, K, N, M, gs, cache);
  if (!(err < 1e-2)) {
    printf("K=%d N=%d M=%d: the GEMM differs from the reference (relative error %.2e)\n", K, N, M, err);
    exit(1);
  }
  const float t_gemm = time_graph([&] { for (int i = 0; i < calls; ++i) gemm(i % copies); }, calls, s);
  const float t_read = time_graph([&] {
    for (int i = 0; i < calls; ++i) {
      const hf_int4::ReadFloorArgs w{{reinterpret_cast<const int4*>(b + (i % copies) * b_ints)}, {b_ints / 4}};
      CK(hf_int4::gemm::launch_maybe_early(hf_int4::read_floor_kernel, dim3(sms * 4), dim3(hf_int4::kReadFloorThreads), 0,
                                           s, true, w, 0x12345678, sink));
    }
  }, calls, s);
  const double mb = (b_ints * 4 + s_halves * 2) / 1e6;
  const double wmb = b_ints * 4 / 1e6;
  printf("K=%d N=%d M=%d tile=%dx%d blocks=%d: gemm %.2f us (%.2f TB/s)  read %.2f us (%.2f TB/s)", K, N, M, tn, tk,
         blocks, t_gemm, mb / t_gemm, t_read, wmb / t_read);
  const char* reads = getenv("PROBE_READS");
  if (reads == nullptr || atoi(reads) == 0) {
    printf("\n");
    return 0;
  }
  const int kt128 = K / 128, nt128 = N / 128;
  auto time_pattern = [&](auto kernel) {
    return time_graph([&] {
      for (int i = 0; i < calls; ++i)
        kernel<<<sms, kPatternThreads, 0, s>>>(reinterpret_cast<const int4*>(b + (i % copies) * b_ints), N, kt128, nt128, sink);
    }, calls, s);
  };
  const float t_pat[2] = {time_pattern(pattern_read_kernel<128, 8, 4>), time_pattern(pattern_read_kernel<128, 8, 8>)};
  // k-splits a power of two, up to ~2 CTAs per SM as in the kernel; run, words: std::integral_constant (the kernel's RUN, WORDS)
  auto time_stream = [&](auto run, auto words) {
    constexpr int kRun = decltype(run)::value;
    const auto kernel = stream_order_read_kernel<kRun, decltype(words)::value>;
    const int col_tiles = N / 2 / (32 * kRun);  // int4 per k-block row / int4 per warp's run
    int splits = 1;
    while (col_tiles * splits * 2 <= 2 * sms && splits * 2 * 8 * 8 <= K / 16) splits *= 2;
    return time_graph([&] {
      for (int i = 0; i < calls; ++i)
        kernel<<<col_tiles * splits, 256, 0, s>>>(reinterpret_cast<const int4*>(b + (i % copies) * b_ints), N / 2, K / 16,
                                                  col_tiles, sink);
    }, calls, s);
  };
  using std::integral_constant;
  const float t_stream[4] = {  // 512-byte, 1 KB and 2 KB runs as int4, then 512-byte runs as the kernel's 32-bit words
      time_stream(integral_constant<int, 1>{}, std::false_type{}), time_stream(integral_constant<int, 2>{}, std::false_type{}),
      time_stream(integral_constant<int, 4>{}, std::false_type{}), time_stream(integral_constant<int, 1>{}, std::true_type{})};
  CK(cudaGetLastError());
  printf("  tile-order read x4 %.2f us (%.2f TB/s) x8 %.2f us (%.2f TB/s)  stream-order read 512 B %.2f us (%.2f TB/s) "
         "1 KB %.2f us (%.2f TB/s) 2 KB %.2f us (%.2f TB/s) 512 B as words %.2f us (%.2f TB/s)\n", t_pat[0],
         wmb / t_pat[0], t_pat[1], wmb / t_pat[1], t_stream[0], wmb / t_stream[0], t_stream[1], wmb / t_stream[1],
         t_stream[2], wmb / t_stream[2], t_stream[3], wmb / t_stream[3]);
  return 0;
}
