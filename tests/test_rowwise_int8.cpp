// Row-wise int8 (LLM.int8 weights): the fast path against the reference, and the rounding rule.
#include <catch2/catch.hpp>
#include <cmath>
#include <random>
#include <vector>

#include "qlora/quant/rowwise_int8.hpp"
#include "test_util.hpp"

using namespace qlora;
using namespace qlora::quant;

TEST_CASE("row-wise int8 rounds half to even and keeps the row absmax", "[quant]") {
  // row absmax 127 makes the scale exactly 1, so x * s == x and the rounding rule shows directly
  const std::vector<float> x = {127.0f, 0.5f, 1.5f, 2.5f, -0.5f, -1.5f, -126.5f, 3.49f, 0, 0, 0, 0,
                                0,      0,    0,    0,    0,     0,     0,       0,     0, 0, 0, 0};
  const RowwiseInt8 q = quantize_rowwise_int8(x.data(), 1, std::int64_t(x.size()));
  REQUIRE(q.scb[0] == 127.0f);
  const std::vector<std::int8_t> want = {127, 0, 2, 2, 0, -2, -126, 3};
  for (std::size_t i = 0; i < want.size(); ++i) REQUIRE(q.q[i] == want[i]);
}

TEST_CASE("fast row-wise int8 equals the reference", "[quant]") {
  std::mt19937 rng(5);
  std::normal_distribution<float> d(0.0f, 0.02f);
  for (auto shape : {std::pair<int, int>{1, 1}, {3, 17}, {64, 64}, {33, 1000}, {5, 4096}}) {
    const int rows = shape.first, cols = shape.second;
    std::vector<float> x(std::size_t(rows) * cols);
    for (auto& v : x) v = d(rng);
    std::fill(x.begin(), x.begin() + cols, 0.0f);  // a zero row
    const RowwiseInt8 fast = quantize_rowwise_int8(x.data(), rows, cols);
    std::vector<std::int8_t> q(x.size());
    std::vector<float> scb(rows);
    ref::quantize_rowwise_int8(x.data(), rows, cols, q.data(), scb.data());
    REQUIRE(fast.q == q);
    REQUIRE(fast.scb == scb);
    std::vector<float> deq(x.size());
    dequantize(fast, deq.data());
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c) {
        const std::size_t i = std::size_t(r) * cols + c;
        REQUIRE(std::fabs(deq[i] - x[i]) <= scb[r] / 127.0f * 0.5f * 1.0001f);  // half a step
      }
  }
}

TEST_CASE("row-wise int8: bf16 / fp16 outputs and bad input", "[quant]") {
  std::vector<float> x(7 * 40);
  std::mt19937 rng(1);
  std::normal_distribution<float> d(0.0f, 1.0f);
  for (auto& v : x) v = d(rng);
  const RowwiseInt8 q = quantize_rowwise_int8(x.data(), 7, 40);
  testutil::require_half_outputs_match(q, x.size());
  x[77] = NAN;
  REQUIRE_THROWS_WITH(quantize_rowwise_int8(x.data(), 7, 40, "layers.2.o_proj.weight"),
                      Catch::Contains("layers.2.o_proj.weight: value 77 is nan"));
  REQUIRE_THROWS_WITH(quantize_rowwise_int8(x.data(), -1, 40), Catch::Contains("got (-1, 40)"));
}

TEST_CASE("row-wise int8: rows with a tiny absmax agree between the paths", "[quant]") {
  // 127 / 1e-38 overflows float: both paths fall back to double precision for such a row
  std::vector<float> x(2 * 24, 0.0f);
  for (int c = 0; c < 24; ++c) x[c] = 1e-38f * float(c - 12) / 12.0f;
  for (int c = 24; c < 48; ++c) x[c] = float(c);
  const RowwiseInt8 fast = quantize_rowwise_int8(x.data(), 2, 24);
  std::vector<std::int8_t> q(x.size());
  std::vector<float> scb(2);
  ref::quantize_rowwise_int8(x.data(), 2, 24, q.data(), scb.data());
  REQUIRE(fast.q == q);
  REQUIRE(q[0] == -127);
  REQUIRE(q[12] == 0);
  REQUIRE(q[18] == 64);  // 6/12 * 127 = 63.5, ties to even
}
