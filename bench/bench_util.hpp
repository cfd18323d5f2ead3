#pragma once
// Shared by the benchmark programs: registration with the statistics docs/performance.md reports.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstddef>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace benchutil {

// Registers a wall-clock benchmark (the kernels run on several threads) in milliseconds, with min and
// max over --benchmark_repetitions: on a machine shared with other work the fastest repetition is
// the least disturbed one, so the docs report the min.
inline benchmark::internal::Benchmark* reg(const std::string& name,
                                           std::function<void(benchmark::State&)> fn) {
  return benchmark::RegisterBenchmark(name.c_str(), [fn](benchmark::State& st) { fn(st); })
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond)
      ->ComputeStatistics("min",
                          [](const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); })
      ->ComputeStatistics("max",
                          [](const std::vector<double>& v) { return *std::max_element(v.begin(), v.end()); });
}

// n values from N(0, sd), the same for the same seed (the benchmarks' weights and activations).
inline std::vector<float> gaussian(std::size_t n, unsigned seed, float sd) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, sd);
  std::vector<float> v(n);
  for (float& e : v) e = dist(rng);
  return v;
}

}  // namespace benchutil
