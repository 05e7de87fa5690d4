// Standalone timing probe for the decode kernel (no torch): per-call time of run_int4_gemm<__half> and of a
// plain read of the same bytes, CUDA-graph replay over rotating weight copies (> 4x L2).
//   nvcc -std=c++17 -O3 -arch=sm_90 -I hf_int4/csrc scripts/decode_probe.cu -o probe   (scripts/probe_sweep.sh)
//   ./probe K N M [thread_n thread_k] [blocks]
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "decode_gemm.cuh"

#define CK(x)                                                                      \
  do {                                                                             \
    cudaError_t e = (x);                                                           \
    if (e != cudaSuccess) {                                                        \
      printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e));             \
      exit(1);                                                                     \
    }                                                                              \
  } while (0)

__global__ void read_kernel(const int4* p, int64_t n, int* sink) {
  int x = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int4 v = __ldcs(p + i);
    x ^= v.x ^ v.y ^ v.z ^ v.w;
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
  std::vector<uint16_t> hs(s_halves, 0x2000), ha(int64_t(M) * K, 0x3c00);  // scales ~0.008, a = 1
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
  CK(cudaMalloc(&sink, 4));
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
  const float t_gemm = time_graph([&] { for (int i = 0; i < calls; ++i) gemm(i % copies); }, calls, s);
  const float t_read = time_graph([&] {
    for (int i = 0; i < calls; ++i) read_kernel<<<sms * 4, 512, 0, s>>>(reinterpret_cast<const int4*>(b + (i % copies) * b_ints), b_ints / 4, sink);
  }, calls, s);
  CK(cudaGetLastError());
  const double mb = (b_ints * 4 + s_halves * 2) / 1e6;
  printf("K=%d N=%d M=%d tile=%dx%d blocks=%d: gemm %.2f us (%.2f TB/s)  read %.2f us (%.2f TB/s)\n", K, N, M, tn, tk,
         blocks, t_gemm, mb / t_gemm, t_read, b_ints * 4 / 1e6 / t_read);
  return 0;
}
