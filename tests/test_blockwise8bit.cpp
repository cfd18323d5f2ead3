// The fast 8-bit dynamic-map quantizer against the reference, including values exactly on midpoints.
#include <catch2/catch.hpp>
#include <cmath>
#include <random>
#include <vector>

#include "qlora/quant/blockwise8bit.hpp"
#include "test_util.hpp"

using namespace qlora;
using namespace qlora::quant;

TEST_CASE("dynamic map encoding: nearest, ties to the even index, NaN to 0", "[quant]") {
  const auto& code = dynamic_map_signed();
  const auto mid = midpoints(code);
  for (int i = 0; i < 256; ++i) REQUIRE(ref::encode_dynamic(code, code[i]) == i);
  for (int i = 0; i < 255; ++i) {
    INFO("midpoint " << i);
    const int even = (i % 2 == 0) ? i : i + 1;
    REQUIRE(ref::encode_dynamic(code, mid[i]) == even);
    REQUIRE(ref::encode_dynamic(code, std::nextafter(mid[i], -2.0f)) == i);
    REQUIRE(ref::encode_dynamic(code, std::nextafter(mid[i], 2.0f)) == i + 1);
  }
  REQUIRE(ref::encode_dynamic(code, NAN) == 0);
  REQUIRE(ref::encode_dynamic(code, -1.0f) == 0);
  REQUIRE(ref::encode_dynamic(code, 1.0001f) == 255);
}

TEST_CASE("fast 8-bit blockwise equals the reference", "[quant]") {
  const auto& code = dynamic_map_signed();
  const auto mid = midpoints(code);
  std::mt19937 rng(3);
  std::normal_distribution<float> d(0.0f, 1.0f);
  for (int bs : {64, 128, 256, 512, 1024, 2048, 4096})
    for (std::size_t n : {std::size_t(1), std::size_t(7), std::size_t(300), std::size_t(4096 * 3 + 1)}) {
      INFO("blocksize " << bs << " n " << n);
      std::vector<float> x(n);
      for (auto& v : x) v = d(rng);
      // every midpoint and its neighbours, with absmax pinned to 1
      if (n > 1000) {
        for (int i = 0; i < 255; ++i) {
          x[3 * i] = mid[i];
          x[3 * i + 1] = std::nextafter(mid[i], -2.0f);
          x[3 * i + 2] = std::nextafter(mid[i], 2.0f);
        }
        for (int b = 0; b * bs < int(n); ++b)
          x[std::size_t(b) * bs + bs / 2 < n ? std::size_t(b) * bs + bs / 2 : n - 1] = 1.0f;
        std::fill(x.end() - std::min<std::ptrdiff_t>(bs, std::ptrdiff_t(n) / 4), x.end(),
                  0.0f);  // a zero block
      }
      const Blockwise8 fast = quantize_blockwise8(x.data(), n, bs);
      std::vector<std::uint8_t> q(n);
      std::vector<float> absmax(num_blocks(n, bs));
      ref::quantize_blockwise8(x.data(), n, bs, code, q.data(), absmax.data());
      REQUIRE(fast.codes == q);
      REQUIRE(fast.absmax == absmax);
      std::vector<float> a(n), b(n);
      dequantize(fast, a.data());
      ref::dequantize_blockwise8(q.data(), absmax.data(), n, bs, code, b.data());
      for (std::size_t i = 0; i < n; ++i) REQUIRE(float_bits(a[i]) == float_bits(b[i]));
    }
  REQUIRE_THROWS_WITH(quantize_blockwise8(nullptr, 0, 32), Catch::Contains("[64, 4096], got 32"));
}

TEST_CASE("8-bit blockwise: bf16 / fp16 outputs and bad input", "[quant]") {
  std::mt19937 rng(9);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> x(5000);
  for (auto& v : x) v = d(rng);
  const Blockwise8 q = quantize_blockwise8(x.data(), x.size(), 512);
  testutil::require_half_outputs_match(q, x.size());
  x[4321] = -INFINITY;
  REQUIRE_THROWS_WITH(quantize_blockwise8(x.data(), x.size(), 512, dynamic_map_signed(), "optimizer.m"),
                      Catch::Contains("optimizer.m: value 4321 is -inf"));
}
