// The frozen-weight products of the CPU backend (backend/cpu/qmatrix.hpp): y (M, N) = x (M, K) . W^T.
//
// Names: matmul/cpu/<type>/<N>x<K>/m<M>
//   f32                 QMatrix::dense (Eigen, split over QLORA_NUM_THREADS threads)
//   bf16, nf4, fp4, int8  QMatrix of that format, default settings (fp32 activations)
//   nf4_a16, fp4_a16    the same weight with ActQuant::Int16 (int16 activations, M <= small_m_max)
//   nf4_a8, fp4_a8, int8_a8  ... with ActQuant::Int8 (int8 activations, M <= small_m_max)
//   eigen_f32_1thread   a plain Eigen product on one thread: the named baseline
// and matmul_backward/cpu/<type>/<N>x<K>/m<M> for dx (M, K) = dy (M, N) . W.
// bandwidth/read_f32/256MiB/threads:<t>: the sum of a 256 MiB float array on t threads, the
// memory read bandwidth the weight GB/s figures compare with.
//
// Counters: bytes_per_second = weight_bytes() per product (the stored weight, read once per call);
// FLOP/s = 2 * M * N * K per product. Weights are N(0, 0.02), 4-bit with blocksize 64 + double quant
// (bitsandbytes' default). A weight smaller than 96 MiB (3x the 32 MiB L3) is held in several copies
// that the iterations rotate through, so each call reads its weight from DRAM, not from cache.
//
// Run: QLORA_NUM_THREADS=2 ./build/bench/bench_matmul --benchmark_min_time=0.2 [--benchmark_filter=...]
//
// GCC 12.2's AVX-512 intrinsic headers trip -Wmaybe-uninitialized inside Eigen's GEMM kernels under
// -march=native (GCC bug 105593); it must be off before the first include.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ == 12
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "bench_util.hpp"

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "qlora/backend/cpu/qmatrix.hpp"
#include "qlora/core/half.hpp"
#include "qlora/core/parallel.hpp"
#include "qlora/quant/blockwise4bit.hpp"
#include "qlora/quant/rowwise_int8.hpp"

namespace {

using qlora::cpu::Accumulate;
using qlora::cpu::ActQuant;
using qlora::cpu::QMatrix;
namespace quant = qlora::quant;

constexpr std::size_t kRotateBytes = std::size_t(96) << 20;

struct Shape {
  std::int64_t N, K;
  std::size_t numel() const { return std::size_t(N) * std::size_t(K); }
  std::string name() const { return std::to_string(N) + "x" + std::to_string(K); }
};

// N(0, 0.02), one tensor per shape (the 11008x4096 one is 180 MB).
const std::vector<float>& weights(const Shape& s) {
  static std::map<std::pair<std::int64_t, std::int64_t>, std::vector<float>> cache;
  auto& w = cache[{s.N, s.K}];
  if (w.empty()) w = benchutil::gaussian(std::size_t(s.numel()), 42, 0.02f);
  return w;
}

QMatrix make(const std::string& type, const Shape& s) {
  const auto& w = weights(s);
  if (type == "f32") return QMatrix::dense(w.data(), s.N, s.K);
  if (type == "bf16") {
    std::vector<qlora::bf16> b(w.size());
    qlora::convert(w.data(), b.data(), w.size());
    return QMatrix::dense_bf16(b.data(), s.N, s.K);
  }
  if (type == "int8" || type == "int8_a8") {
    auto m = QMatrix::from(quant::quantize_rowwise_int8(w.data(), s.N, s.K));
    if (type == "int8_a8") m.set_act_quant(ActQuant::Int8);
    return m;
  }
  const auto t = type.substr(0, 3) == "nf4" ? quant::Quant4Type::NF4 : quant::Quant4Type::FP4;
  auto m = QMatrix::from(quant::quantize_4bit(w.data(), {s.N, s.K}, {t, 64, true}));
  if (type.size() > 3 && type.substr(3) == "_a8") m.set_act_quant(ActQuant::Int8);
  if (type.size() > 3 && type.substr(3) == "_a16") m.set_act_quant(ActQuant::Int16);
  return m;
}

// Copies of a weight so that together they exceed the L3 (only where the weight is read once per
// call: at M = 512 the product is compute-bound and one copy serves).
std::vector<QMatrix> copies(const std::string& type, const Shape& s, std::int64_t M) {
  std::vector<QMatrix> v;
  v.push_back(make(type, s));
  const std::size_t bytes = v[0].weight_bytes();
  const std::size_t n = M >= 64 ? 1 : std::max<std::size_t>(1, (kRotateBytes + bytes - 1) / bytes);
  while (v.size() < n) v.push_back(make(type, s));
  return v;
}

void set_counters(benchmark::State& st, std::size_t weight_bytes, std::int64_t M, const Shape& s) {
  st.SetBytesProcessed(std::int64_t(st.iterations()) * std::int64_t(weight_bytes));
  st.counters["FLOP/s"] = benchmark::Counter(2.0 * double(M) * double(s.N) * double(s.K),
                                             benchmark::Counter::kIsIterationInvariantRate);
}

using benchutil::reg;

void register_qmatrix(const std::string& type, const Shape& s, std::int64_t M, bool backward) {
  const std::string name = std::string(backward ? "matmul_backward" : "matmul") + "/cpu/" + type + "/" +
                           s.name() + "/m" + std::to_string(M);
  reg(name, [=](benchmark::State& st) {
    const auto ws = copies(type, s, M);
    const std::int64_t in = backward ? s.N : s.K, out = backward ? s.K : s.N;
    std::mt19937 rng(1);
    std::normal_distribution<float> d(0.0f, 1.0f);
    std::vector<float> x(std::size_t(M * in)), y(std::size_t(M * out));
    for (float& v : x) v = d(rng);
    std::size_t i = 0;
    for (auto _ : st) {
      const QMatrix& w = ws[i++ % ws.size()];
      if (backward)
        w.backward(x.data(), M, y.data(), Accumulate::No);
      else
        w.forward(x.data(), M, y.data(), Accumulate::No);
      benchmark::DoNotOptimize(y.data());
      benchmark::ClobberMemory();
    }
    set_counters(st, ws[0].weight_bytes(), M, s);
  });
}

// Plain Eigen, one thread: Y (M, N) = X (M, K) . W^T with W row-major (N, K).
void register_eigen_1thread(const Shape& s, std::int64_t M) {
  reg("matmul/cpu/eigen_f32_1thread/" + s.name() + "/m" + std::to_string(M), [=](benchmark::State& st) {
    using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    const auto& w = weights(s);
    Eigen::Map<const RowMat> W(w.data(), s.N, s.K);  // (N, K)
    RowMat X = RowMat::Random(M, s.K), Y(M, s.N);    // (M, K), (M, N)
    for (auto _ : st) {
      Y.noalias() = X * W.transpose();
      benchmark::DoNotOptimize(Y.data());
      benchmark::ClobberMemory();
    }
    set_counters(st, w.size() * sizeof(float), M, s);
  });
}

// Sum of a 256 MiB float array on `threads` threads (std::thread, independent of QLORA_NUM_THREADS).
// streams = 1: each thread reads its half front to back; streams = 4: each thread reads the four
// quarters of its half interleaved (as a GEMV reads several weight rows at once), which gives the
// prefetchers more to work with.
void register_read_bandwidth(int threads, int streams) {
  const std::string name =
      streams == 1 ? "bandwidth/read_f32/256MiB/threads:" : "bandwidth/read_f32_4streams/256MiB/threads:";
  reg(name + std::to_string(threads), [=](benchmark::State& st) {
    const std::size_t n = (std::size_t(256) << 20) / sizeof(float);
    std::vector<float> a(n, 1.0f);
    std::vector<float> part(std::size_t(threads) * 16);
    auto sum = [&](int t) {
      const std::size_t b = n * std::size_t(t) / std::size_t(threads) / 32 * 32,
                        e = n * std::size_t(t + 1) / std::size_t(threads) / 32 * 32;
      float s = 0.0f;
#ifdef __AVX2__
      // 4 independent vector accumulators, 32 floats per iteration: load-bound, not add-latency-bound
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      if (streams == 1) {
        for (std::size_t i = b; i < e; i += 32)
          for (int j = 0; j < 4; ++j) acc[j] = _mm256_add_ps(acc[j], _mm256_loadu_ps(a.data() + i + 8 * j));
      } else {
        const std::size_t q = (e - b) / 4 / 8 * 8;  // four quarters, read 8 floats from each in turn
        for (std::size_t i = 0; i < q; i += 8)
          for (int j = 0; j < 4; ++j)
            acc[j] = _mm256_add_ps(acc[j], _mm256_loadu_ps(a.data() + b + std::size_t(j) * q + i));
      }
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
      for (float v : lanes) s += v;
#else
      float acc[8] = {};
      for (std::size_t i = b; i < e; i += 8)
        for (int j = 0; j < 8; ++j) acc[j] += a[i + std::size_t(j)];
      for (float v : acc) s += v;
#endif
      part[std::size_t(t) * 16] = s;
    };
    for (auto _ : st) {
      std::vector<std::thread> pool;
      for (int t = 1; t < threads; ++t) pool.emplace_back(sum, t);
      sum(0);
      for (auto& th : pool) th.join();
      benchmark::DoNotOptimize(part.data());
    }
    st.SetBytesProcessed(std::int64_t(st.iterations()) * std::int64_t(n * sizeof(float)));
  });
}

#ifdef __AVX2__
// The FMA peak of `threads` cores: 10 independent chains of 8-lane fp32 FMAs per thread (enough to
// cover the FMA latency on Zen), reported as FLOP/s. The M = 512 products are compared with it.
void register_fma_peak(int threads) {
  reg("peak/fma_f32_avx2/threads:" + std::to_string(threads), [=](benchmark::State& st) {
    constexpr int kChains = 10;
    constexpr std::int64_t kIters = 1 << 20;
    std::vector<float> out(std::size_t(threads) * 16);
    auto run = [&](int t) {
      __m256 acc[kChains];
      for (int j = 0; j < kChains; ++j) acc[j] = _mm256_set1_ps(float(j + t));
      const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
      for (std::int64_t i = 0; i < kIters; ++i)
        for (int j = 0; j < kChains; ++j) acc[j] = _mm256_fmadd_ps(acc[j], a, b);
      __m256 s = acc[0];
      for (int j = 1; j < kChains; ++j) s = _mm256_add_ps(s, acc[j]);
      out[std::size_t(t) * 16] = _mm256_cvtss_f32(s);
    };
    for (auto _ : st) {
      std::vector<std::thread> pool;
      for (int t = 1; t < threads; ++t) pool.emplace_back(run, t);
      run(0);
      for (auto& th : pool) th.join();
      benchmark::DoNotOptimize(out.data());
    }
    st.counters["FLOP/s"] = benchmark::Counter(double(threads) * kIters * kChains * 8 * 2,
                                               benchmark::Counter::kIsIterationInvariantRate);
  });
}
#endif

}  // namespace

int main(int argc, char** argv) {
#ifdef __AVX2__
  register_fma_peak(1);
  register_fma_peak(2);
#endif
  for (int streams : {1, 4}) {
    register_read_bandwidth(1, streams);
    register_read_bandwidth(2, streams);
  }
  const Shape shapes[] = {{4096, 4096}, {11008, 4096}, {4096, 11008}};
  for (const Shape& s : shapes)
    for (std::int64_t M : {1, 8, 512}) {
      for (const char* t :
           {"f32", "bf16", "nf4", "nf4_a16", "nf4_a8", "fp4", "fp4_a16", "fp4_a8", "int8", "int8_a8"}) {
        // above small_m_max() the activation mode does not matter (tiled fp32 path): skip the repeats
        const bool act_variant = std::string(t).find("_a") != std::string::npos;
        if (!act_variant || M <= 8) register_qmatrix(t, s, M, false);
      }
      register_eigen_1thread(s, M);
    }
  for (const Shape& s : shapes)
    for (std::int64_t M : {1, 512})
      for (const char* t : {"f32", "nf4"}) register_qmatrix(t, s, M, true);

  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
