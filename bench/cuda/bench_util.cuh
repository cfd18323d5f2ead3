#pragma once
// What the CUDA benchmarks share: random bf16 fills, the graph-replay timer and the report lines.
//
// time_graph: the best of `reps` replays of a CUDA graph of `calls` calls of fn(i), timed with CUDA
// events and divided by `calls` (the method of ../shared/ANCHORS.md), after ≥ 25 ms of warm
// replays so the SM clock has left its idle level. Report lines look like Google
// Benchmark's, `name  time  notes`, and go to the CSV given with set_csv too.
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#include "qlora/cuda/context.cuh"
#include "qlora/cuda/quantized4bit.cuh"

namespace qlora {
namespace benchutil {

static __global__ void fill_uniform(__nv_bfloat16* p, std::size_t n, std::uint32_t seed, float scale) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
       i += std::size_t(gridDim.x) * blockDim.x) {
    std::uint32_t h = std::uint32_t(i) * 0x9E3779B1u ^ seed ^ std::uint32_t(i >> 32) * 0x85EBCA77u;
    h ^= h >> 15, h *= 0x2C1B3C6Du, h ^= h >> 12, h *= 0x297A2D39u, h ^= h >> 15;
    p[i] = __float2bfloat16_rn((float(h >> 8) * (1.0f / 16777216.0f) - 0.5f) * scale);
  }
}

inline void fill(const cuda::Context& ctx, __nv_bfloat16* p, std::size_t n, std::uint32_t seed, float scale) {
  fill_uniform<<<4096, 256, 0, ctx.stream()>>>(p, n, seed, scale);
  QLORA_CUDA_CHECK_LAUNCH("fill_uniform");
}

// How many copies of an operand of `bytes` bytes the benchmarks rotate through: together at least
// 512 MiB (2 to 64 copies), so that no call finds its operand in the L2 the call before left.
inline int rotation_copies(std::size_t bytes) {
  const std::size_t rotate_bytes = std::size_t(512) << 20;
  return int(std::min<std::size_t>(64, std::max<std::size_t>(2, (rotate_bytes + bytes - 1) / bytes)));
}

// `copies` random bf16 weights of n values each (uniform in ±0.025, seeds 100, 101, ...).
inline std::vector<cuda::DeviceBuffer<__nv_bfloat16>> random_weights(const cuda::Context& ctx, std::size_t n,
                                                                     int copies) {
  std::vector<cuda::DeviceBuffer<__nv_bfloat16>> w;
  for (int i = 0; i < copies; ++i) {
    w.emplace_back(n);
    fill(ctx, w.back().data(), n, 100 + i, 0.05f);
  }
  return w;
}

// A copy of q in new device memory (the benchmarks rotate through copies, so no call finds its
// weight in the L2 the call before left).
inline cuda::DeviceQuantized4bit clone(const cuda::Context& ctx, const cuda::DeviceQuantized4bit& q) {
  cuda::DeviceQuantized4bit c;
  c.type = q.type, c.blocksize = q.blocksize, c.shape = q.shape, c.dtype = q.dtype, c.code = q.code;
  c.double_quant = q.double_quant, c.offset = q.offset, c.nested_blocksize = q.nested_blocksize;
  c.nested_code = q.nested_code, c.layout = q.layout;
  auto cp = [&](auto& dst, const auto& src) {
    using T = std::remove_reference_t<decltype(*src.data())>;
    dst = cuda::DeviceBuffer<std::remove_const_t<T>>(src.size());
    if (src.size())
      QLORA_CUDA_CHECK(
          cudaMemcpyAsync(dst.data(), src.data(), src.bytes(), cudaMemcpyDeviceToDevice, ctx.stream()));
  };
  cp(c.packed, q.packed);
  cp(c.absmax, q.absmax);
  cp(c.qabsmax, q.qabsmax);
  cp(c.absmax2, q.absmax2);
  return c;
}

// Milliseconds between two events around fn's work on stream s (waits for it).
template <class F>
float elapsed_ms(cudaStream_t s, cudaEvent_t a, cudaEvent_t b, F&& fn) {
  QLORA_CUDA_CHECK(cudaEventRecord(a, s));
  fn();
  QLORA_CUDA_CHECK(cudaEventRecord(b, s));
  QLORA_CUDA_CHECK(cudaEventSynchronize(b));
  float ms = 0;
  QLORA_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
  return ms;
}

// A CUDA graph of `calls` calls of fn(i), captured after one warm-up call outside the capture
// (module loading, cuBLAS heuristics, attributes); replay_us() times one replay, per call.
class CallGraph {
 public:
  CallGraph(const cuda::Context& ctx, const std::function<void(int)>& fn, int calls)
      : s_(ctx.stream()), calls_(calls) {
    fn(0);
    ctx.synchronize();
    cudaGraph_t graph;
    QLORA_CUDA_CHECK(cudaStreamBeginCapture(s_, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < calls; ++i) fn(i);
    QLORA_CUDA_CHECK(cudaStreamEndCapture(s_, &graph));
    QLORA_CUDA_CHECK(cudaGraphInstantiate(&exec_, graph, 0));
    cudaGraphDestroy(graph);
    QLORA_CUDA_CHECK(cudaEventCreate(&a_));
    QLORA_CUDA_CHECK(cudaEventCreate(&b_));
  }
  CallGraph(const CallGraph&) = delete;
  CallGraph& operator=(const CallGraph&) = delete;
  ~CallGraph() {
    cudaEventDestroy(a_);
    cudaEventDestroy(b_);
    cudaGraphExecDestroy(exec_);
  }
  double replay_us() {
    return double(elapsed_ms(s_, a_, b_, [&] { QLORA_CUDA_CHECK(cudaGraphLaunch(exec_, s_)); })) * 1000.0 /
           calls_;
  }
  // Warm replays until at least 25 ms of GPU time have run: the SM clock idles low (345 MHz on the
  // H100 / H200 machines) and ramps up only under sustained load, so a short burst of work would be
  // timed at whatever clock the previous idle gap left.
  void warm() {
    double warm_us = 0;
    for (int w = 0; w < 1000 && warm_us < 25000.0; ++w) warm_us += replay_us() * calls_;
  }

 private:
  cudaStream_t s_;
  int calls_;
  cudaGraphExec_t exec_;
  cudaEvent_t a_, b_;
};

// Best of `reps` replays of a graph of `calls` calls of fn(i), in microseconds per call.
inline double time_graph(const cuda::Context& ctx, const std::function<void(int)>& fn, int calls = 30,
                         int reps = 5) {
  CallGraph g(ctx, fn, calls);
  g.warm();
  double best = 1e30;
  for (int r = 0; r < reps; ++r) best = std::min(best, g.replay_us());
  return best;
}

// Two graphs timed in alternation, `rounds` rounds of one replay of each (a, then b), so that both see
// the same clock and temperature; time_graph's figures of two rows taken seconds apart can differ by
// more than the effect measured (the SM clock of a compute-bound product drifts under its power limit).
struct PairTiming {
  double best_a, best_b;        // µs per call, best replay of each
  double ratio_median;          // median over the rounds of b / a
  double ratio_min, ratio_max;  // their spread
};
inline PairTiming time_graph_pair(const cuda::Context& ctx, const std::function<void(int)>& fa,
                                  const std::function<void(int)>& fb, int calls = 30, int rounds = 11) {
  CallGraph ga(ctx, fa, calls), gb(ctx, fb, calls);
  ga.warm();
  gb.warm();
  PairTiming t{1e30, 1e30, 0, 1e30, 0};
  std::vector<double> ratios;
  for (int r = 0; r < rounds; ++r) {
    const double a = ga.replay_us(), b = gb.replay_us();
    t.best_a = std::min(t.best_a, a);
    t.best_b = std::min(t.best_b, b);
    ratios.push_back(b / a);
  }
  std::sort(ratios.begin(), ratios.end());
  t.ratio_median = ratios[ratios.size() / 2];
  t.ratio_min = ratios.front();
  t.ratio_max = ratios.back();
  return t;
}

// Best of `reps` timed calls, after one untimed (module loading), of fn, a quantizer that
// synchronizes itself (it reads its NaN check back), so it cannot go into a graph; in microseconds.
// Its result lives until after the stop event: the free is not timed, the allocation is.
template <class F>
double time_blocking(const cuda::Context& ctx, F&& fn, int reps = 5) {
  cudaEvent_t a, b;
  QLORA_CUDA_CHECK(cudaEventCreate(&a));
  QLORA_CUDA_CHECK(cudaEventCreate(&b));
  { auto warm = fn(); }
  float best = 1e30f;
  for (int r = 0; r < reps; ++r) {
    decltype(fn()) q;
    best = std::min(best, elapsed_ms(ctx.stream(), a, b, [&] { q = fn(); }));
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return double(best) * 1000.0;
}

inline FILE*& csv() {
  static FILE* f = nullptr;
  return f;
}

// The start of a benchmark's main: false (after saying so) when there is no device; else opens the
// CSV named by argv[1], if any, and writes its header.
inline bool start(int argc, char** argv) {
  if (cuda::device_count() == 0) {
    std::printf("no CUDA device: nothing to measure\n");
    return false;
  }
  if (argc > 1) csv() = std::fopen(argv[1], "w");
  if (csv()) std::fprintf(csv(), "name,us,notes\n");
  return true;
}

inline void report(const std::string& name, double us, const std::string& extra) {
  std::printf("%-44s %10.2f us   %s\n", name.c_str(), us, extra.c_str());
  std::fflush(stdout);
  if (csv()) std::fprintf(csv(), "%s,%.4f,\"%s\"\n", name.c_str(), us, extra.c_str());
}

inline std::string fmt(const char* f, double a, double b = 0, double c = 0, double d = 0) {
  char buf[256];
  std::snprintf(buf, sizeof buf, f, a, b, c, d);
  return buf;
}

}  // namespace benchutil
}  // namespace qlora
