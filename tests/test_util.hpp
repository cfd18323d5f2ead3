#pragma once
// Helpers shared by tests: a temporary folder removed at scope exit, random data.
#include <stdlib.h>

#include <catch2/catch.hpp>
#include <random>
#include <string>
#include <vector>

#include "qlora/io/atomic_dir.hpp"
#include "qlora/quant/blockwise4bit.hpp"
#include "qlora/quant/blockwise8bit.hpp"
#include "qlora/quant/rowwise_int8.hpp"

namespace testutil {

struct TempDir {
  std::string path;
  TempDir() {
    char buf[] = "/tmp/qlora-test-XXXXXX";
    path = ::mkdtemp(buf);
  }
  ~TempDir() { qlora::rm_rf(path); }
  std::string operator/(const std::string& name) const { return path + "/" + name; }
};

inline std::vector<float> gaussian(std::size_t n, unsigned seed, float std = 0.02f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, std);
  std::vector<float> x(n);
  for (auto& v : x) v = d(rng);
  return x;
}

// dequantize(q, out) to bf16 and fp16 must equal the fp32 output rounded to nearest even.
template <class Q>
void require_half_outputs_match(const Q& q, std::size_t n) {
  std::vector<float> f(n);
  std::vector<qlora::bf16> b(n);
  std::vector<qlora::fp16> h(n);
  qlora::quant::dequantize(q, f.data());
  qlora::quant::dequantize(q, b.data());
  qlora::quant::dequantize(q, h.data());
  for (std::size_t i = 0; i < n; ++i) {
    INFO("element " << i);
    REQUIRE(b[i].bits == qlora::to_bf16(f[i]).bits);
    REQUIRE(h[i].bits == qlora::to_fp16(f[i]).bits);
  }
}

}  // namespace testutil
