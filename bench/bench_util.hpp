#pragma once
// Shared by the benchmark programs: registration with the statistics docs/performance.md reports.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <functional>
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

}  // namespace benchutil
