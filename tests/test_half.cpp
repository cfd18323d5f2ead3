// bf16 / fp16 <-> fp32 over all 65,536 bit patterns, rounding checked at every midpoint.
#include <catch2/catch.hpp>
#include <cmath>
#include <random>
#include <vector>

#include "qlora/core/half.hpp"

using namespace qlora;

namespace {
bool is_nan16(std::uint16_t b, bool bf) {
  return bf ? ((b & 0x7f80) == 0x7f80 && (b & 0x7f)) : ((b & 0x7c00) == 0x7c00 && (b & 0x3ff));
}
// The next representable half above h (h positive, finite), as fp32: exact.
template <class H>
double next_up(H h) {
  H n{std::uint16_t(h.bits + 1)};
  return double(to_float(n));
}
}  // namespace

TEST_CASE("bf16: every pattern round-trips through fp32", "[half]") {
  std::vector<bf16> all(65536), back(65536);
  std::vector<float> f(65536);
  for (std::uint32_t b = 0; b < 65536; ++b) all[b].bits = std::uint16_t(b);
  convert(all.data(), f.data(), all.size());
  for (std::uint32_t b = 0; b < 65536; ++b) {
    REQUIRE(float_bits(f[b]) == b << 16);  // widening is exact
    REQUIRE(float_bits(to_float(all[b])) == b << 16);
  }
  convert(f.data(), back.data(), f.size());
  for (std::uint32_t b = 0; b < 65536; ++b) {
    INFO("pattern " << b);
    const std::uint16_t s = to_bf16(f[b]).bits;
    REQUIRE(s == back[b].bits);  // SIMD path equals the scalar reference
    if (is_nan16(std::uint16_t(b), true)) {
      REQUIRE(is_nan16(s, true));
      REQUIRE((s & 0x8000) == (b & 0x8000));  // sign kept
    } else {
      REQUIRE(s == b);
    }
  }
}

TEST_CASE("fp16: every pattern round-trips through fp32", "[half]") {
  std::vector<fp16> all(65536), back(65536);
  std::vector<float> f(65536);
  for (std::uint32_t b = 0; b < 65536; ++b) all[b].bits = std::uint16_t(b);
  convert(all.data(), f.data(), all.size());
  for (std::uint32_t b = 0; b < 65536; ++b) {
    INFO("pattern " << b);
    REQUIRE(float_bits(f[b]) == float_bits(to_float(all[b])));
    if (!is_nan16(std::uint16_t(b), false)) {
      // value check against an independent formula
      const int e = (b >> 10) & 0x1f, m = b & 0x3ff;
      double v = e == 0 ? std::ldexp(double(m), -24) : e == 31 ? INFINITY : std::ldexp(1024.0 + m, e - 25);
      if (b & 0x8000) v = -v;
      REQUIRE(double(f[b]) == v);
    } else {
      REQUIRE(std::isnan(f[b]));
    }
  }
  convert(f.data(), back.data(), f.size());
  for (std::uint32_t b = 0; b < 65536; ++b) {
    INFO("pattern " << b);
    const std::uint16_t s = to_fp16(f[b]).bits;
    REQUIRE(s == back[b].bits);
    if (is_nan16(std::uint16_t(b), false)) {
      REQUIRE(is_nan16(s, false));
      REQUIRE((s & 0x8000) == (b & 0x8000));
    } else {
      REQUIRE(s == b);
    }
  }
}

// Between two neighbours a < b (positive), check values just below, at, and just above the
// midpoint: below -> a, above -> b, exactly at -> whichever has an even mantissa.
template <class H, class Conv>
void check_midpoints(std::uint16_t last_finite, Conv conv) {
  for (std::uint16_t b = 0; b < last_finite; ++b) {
    const H a{b};
    const double lo = double(to_float(a)), hi = next_up(a);
    const float mid = float((lo + hi) / 2);  // exact in fp32: halves have <= 11 significant bits
    INFO("pattern " << b);
    REQUIRE(double(mid) == (lo + hi) / 2);
    const std::uint16_t even = (b & 1) ? std::uint16_t(b + 1) : b;
    REQUIRE(conv(mid) == even);
    REQUIRE(conv(std::nextafter(mid, 0.0f)) == b);
    REQUIRE(conv(std::nextafter(mid, INFINITY)) == b + 1);
    REQUIRE(conv(-mid) == (even | 0x8000));
  }
}

TEST_CASE("bf16: rounding is to nearest, ties to even", "[half]") {
  check_midpoints<bf16>(0x7f7f, [](float x) { return to_bf16(x).bits; });
  // overflow past the largest finite value goes to inf
  REQUIRE(to_bf16(3.4e38f).bits == 0x7f80);
  REQUIRE(to_bf16(-INFINITY).bits == 0xff80);
}

TEST_CASE("fp16: rounding is to nearest, ties to even", "[half]") {
  check_midpoints<fp16>(0x7bff, [](float x) { return to_fp16(x).bits; });
  REQUIRE(to_fp16(65519.99f).bits == 0x7bff);
  REQUIRE(to_fp16(65520.0f).bits == 0x7c00);
  REQUIRE(to_fp16(1e-8f).bits == 0x0000);           // below half the smallest subnormal
  REQUIRE(to_fp16(2.9802322e-08f).bits == 0x0000);  // exactly half of 2^-24: tie to even (0)
  REQUIRE(to_fp16(3.0e-08f).bits == 0x0001);
}

TEST_CASE("bulk converters agree with the scalar ones on random fp32", "[half]") {
  std::mt19937 rng(7);
  std::vector<float> x(10007);
  for (auto& v : x) v = bits_float(rng());
  std::vector<bf16> b(x.size());
  std::vector<fp16> h(x.size());
  convert(x.data(), b.data(), x.size());
  convert(x.data(), h.data(), x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    INFO("value bits " << float_bits(x[i]));
    REQUIRE(b[i].bits == to_bf16(x[i]).bits);
    REQUIRE(h[i].bits == to_fp16(x[i]).bits);
  }
}
