#pragma once
// Helpers shared by tests: a temporary folder removed at scope exit, random data.
#include <stdlib.h>

#include <random>
#include <string>
#include <vector>

#include "qlora/io/quantize_model.hpp"

namespace testutil {

struct TempDir {
  std::string path;
  TempDir() {
    char buf[] = "/tmp/qlora-test-XXXXXX";
    path = ::mkdtemp(buf);
  }
  ~TempDir() { qlora::checkpoint::detail::rm_rf(path); }
  std::string operator/(const std::string& name) const { return path + "/" + name; }
};

inline std::vector<float> gaussian(std::size_t n, unsigned seed, float std = 0.02f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, std);
  std::vector<float> x(n);
  for (auto& v : x) v = d(rng);
  return x;
}

}  // namespace testutil
