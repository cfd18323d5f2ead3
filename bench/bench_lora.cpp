// One LoRA training step on the CPU (forward + backward: dx, dA, dB), per base format:
//   lora_step/cpu/<type>/<N>x<K>/m<M>/r<R>
// N x K is the base weight (out x in), M the token count, R the rank. The base weights are
// N(0, 0.02); the 4-bit ones NF4/FP4 with blocksize 64 and double quantization (bitsandbytes'
// defaults for QLoRA). The counter "base_share" is not measured here; compare with the matmul
// benchmarks (bench_matmul) of the same shape for the cost of the base product alone.
#include <benchmark/benchmark.h>

#include <random>
#include <string>
#include <vector>

#include "bench_util.hpp"
#include "qlora/backend/cpu/lora_linear.hpp"

using namespace qlora;

namespace {
using benchutil::gaussian;

template <class Quant>
BaseWeight<Quant> make_base(const std::vector<float>& w, std::int64_t N, std::int64_t K);
template <>
BaseWeight<format::F32> make_base(const std::vector<float>& w, std::int64_t N, std::int64_t K) {
  return BaseWeight<format::F32>(w, N, K);
}
template <>
BaseWeight<format::NF4> make_base(const std::vector<float>& w, std::int64_t N, std::int64_t K) {
  return BaseWeight<format::NF4>::quantize(w.data(), N, K);
}
template <>
BaseWeight<format::FP4> make_base(const std::vector<float>& w, std::int64_t N, std::int64_t K) {
  return BaseWeight<format::FP4>::quantize(w.data(), N, K);
}
template <>
BaseWeight<format::Int8> make_base(const std::vector<float>& w, std::int64_t N, std::int64_t K) {
  return BaseWeight<format::Int8>::quantize(w.data(), N, K);
}

template <class Quant>
void register_step(std::int64_t N, std::int64_t K, std::int64_t M, int R) {
  const std::string name = std::string("lora_step/cpu/") + Quant::name + "/" + std::to_string(N) + "x" +
                           std::to_string(K) + "/m" + std::to_string(M) + "/r" + std::to_string(R);
  benchmark::RegisterBenchmark(
      name.c_str(),
      [=](benchmark::State& st) {
        const auto w = gaussian(std::size_t(N * K), 1, 0.02f);
        LoraConfig cfg;
        cfg.r = R;
        cfg.alpha = 2.0f * float(R);
        cfg.init = LoraInit::NonZero;
        LoraLinear<Quant, Dynamic, Cpu> L(make_base<Quant>(w, N, K), cfg);
        const auto x = gaussian(std::size_t(M * K), 2, 1.0f);
        const auto dy = gaussian(std::size_t(M * N), 3, 1.0f);
        std::vector<float> y(std::size_t(M * N)), dx(std::size_t(M * K));
        typename LoraLinear<Quant, Dynamic, Cpu>::Context ctx;
        for (auto _ : st) {
          L.forward(x.data(), M, y.data(), ctx);
          L.backward(ctx, dy.data(), dx.data(), GradMode::Overwrite);
          benchmark::DoNotOptimize(dx.data());
          benchmark::ClobberMemory();
        }
        // forward base 2MNK + backward base 2MNK + LoRA (x·Aᵀ, h·Bᵀ, dB, dh, dA, dh·A) 12·M·R·(N+K)/2
        const double flops = 4.0 * double(M) * double(N) * double(K) + 6.0 * double(M) * R * double(N + K);
        st.counters["GFLOP/s"] =
            benchmark::Counter(flops * double(st.iterations()) * 1e-9, benchmark::Counter::kIsRate);
      })
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
}
}  // namespace

int main(int argc, char** argv) {
  for (auto shape : {std::pair<std::int64_t, std::int64_t>{4096, 4096}, {11008, 4096}})
    for (std::int64_t M : {1, 8, 512})
      for (int R : {16}) {
        register_step<format::F32>(shape.first, shape.second, M, R);
        register_step<format::NF4>(shape.first, shape.second, M, R);
        register_step<format::FP4>(shape.first, shape.second, M, R);
        register_step<format::Int8>(shape.first, shape.second, M, R);
      }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
