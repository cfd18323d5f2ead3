// The fast NF4/FP4 paths against the scalar reference: every blocksize, odd and partial shapes,
// values on and next to every threshold, all-zero blocks, and the double quantization.
#include <catch2/catch.hpp>
#include <cmath>
#include <random>
#include <vector>

#include "qlora/quant/blockwise4bit.hpp"

using namespace qlora;
using namespace qlora::quant;

namespace {
std::vector<float> gaussian(std::size_t n, unsigned seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> x(n);
  for (auto& v : x) v = d(rng);
  return x;
}

// Inputs whose scaled values land exactly on, and one ulp either side of, every threshold: with a
// block absmax of exactly 1.0, x * (1.0f / 1.0f) == x.
std::vector<float> threshold_probes(Quant4Type t) {
  std::vector<float> th;
  if (t == Quant4Type::NF4)
    th.assign(std::begin(codebook::kNF4Thresholds), std::end(codebook::kNF4Thresholds));
  else
    for (float v : codebook::kFP4Thresholds) {
      th.push_back(v);
      th.push_back(-v);
    }
  std::vector<float> x;
  for (float v : th) {
    x.push_back(v);
    x.push_back(std::nextafter(v, -2.0f));
    x.push_back(std::nextafter(v, 2.0f));
  }
  for (float v : code4(t)) x.push_back(v);
  x.push_back(-0.0f);
  x.push_back(1.0f);  // pins absmax to 1 in every block that contains it
  return x;
}

Quantized4bit reference(const std::vector<float>& x, const Quant4Config& cfg) {
  Quantized4bit q;
  q.packed.resize((x.size() + 1) / 2);
  q.absmax.resize(num_blocks(x.size(), cfg.blocksize));
  ref::quantize_4bit(x.data(), x.size(), cfg.type, cfg.blocksize, q.packed.data(), q.absmax.data());
  return q;
}
}  // namespace

TEST_CASE("4-bit encoders: thresholds and special values", "[quant]") {
  // exactly on a threshold -> lower code; just above -> upper code
  for (int i = 0; i < 15; ++i) {
    const float t = codebook::kNF4Thresholds[i];
    REQUIRE(ref::encode_nf4(t) == i);
    REQUIRE(ref::encode_nf4(std::nextafter(t, 2.0f)) == i + 1);
  }
  for (int c = 0; c < 16; ++c) REQUIRE(ref::encode_nf4(code4(Quant4Type::NF4)[c]) == c);
  for (int c = 0; c < 16; ++c) {
    if (c == 8) continue;  // -0 encodes as +0 (code 0): the sign bit is set only for x < 0
    REQUIRE(ref::encode_fp4(code4(Quant4Type::FP4)[c]) == c);
  }
  REQUIRE(ref::encode_nf4(NAN) == 0);
  REQUIRE(ref::encode_fp4(NAN) == 0);
  REQUIRE(ref::encode_fp4(-0.0f) == 0);
  REQUIRE(ref::encode_fp4(-1e-9f) == 8);
}

TEST_CASE("fast 4-bit quantize/dequantize equal the reference", "[quant]") {
  const std::size_t sizes[] = {1, 2, 15, 31, 33, 64, 1000, 4097, 37 * 53, 3 * 4096 + 17, 70001};
  for (Quant4Type type : {Quant4Type::NF4, Quant4Type::FP4})
    for (int bs : {32, 64, 128, 256, 512, 1024, 2048, 4096})
      for (std::size_t n : sizes) {
        INFO(quant4_name(type) << " blocksize " << bs << " n " << n);
        auto x = gaussian(n, unsigned(n * 31 + bs), 0.02f);
        if (n > 100) {  // an all-zero block and threshold probes in the mix
          const std::size_t z = std::min<std::size_t>(bs, n - 1);
          std::fill(x.begin(), x.begin() + z, 0.0f);
          const auto probes = threshold_probes(type);
          std::copy(probes.begin(), probes.begin() + std::min(probes.size(), n - z), x.begin() + z);
        }
        const Quant4Config cfg{type, bs, false};
        const Quantized4bit fast = quantize_4bit(x.data(), {std::int64_t(n)}, cfg);
        const Quantized4bit slow = reference(x, cfg);
        REQUIRE(fast.packed == slow.packed);
        REQUIRE(fast.absmax == slow.absmax);

        std::vector<float> a(n), b(n);
        dequantize(fast, a.data());
        ref::dequantize_4bit(slow.packed.data(), slow.absmax.data(), n, decode_table(fast), bs, b.data());
        for (std::size_t i = 0; i < n; ++i) REQUIRE(float_bits(a[i]) == float_bits(b[i]));
        std::vector<bf16> ab(n), bb(n);
        std::vector<fp16> ah(n), bh(n);
        dequantize(fast, ab.data());
        dequantize(fast, ah.data());
        ref::dequantize_4bit(slow.packed.data(), slow.absmax.data(), n, decode_table(fast), bs, bb.data());
        ref::dequantize_4bit(slow.packed.data(), slow.absmax.data(), n, decode_table(fast), bs, bh.data());
        for (std::size_t i = 0; i < n; ++i) {
          REQUIRE(ab[i].bits == bb[i].bits);
          REQUIRE(ah[i].bits == bh[i].bits);
        }
      }
}

TEST_CASE("threshold probes through a whole block hit the exact codes", "[quant]") {
  for (Quant4Type type : {Quant4Type::NF4, Quant4Type::FP4}) {
    auto x = threshold_probes(type);
    x.resize(64, 0.0f);
    const Quantized4bit q = quantize_4bit(x.data(), {64}, {type, 64, false});
    REQUIRE(q.absmax[0] == 1.0f);
    for (std::size_t i = 0; i < x.size(); ++i) {
      const std::uint8_t code = (i % 2 == 0) ? q.packed[i / 2] >> 4 : q.packed[i / 2] & 0xf;
      REQUIRE(code == ref::encode4(type, x[i]));
    }
  }
}

TEST_CASE("double quantization: decode and round trip", "[quant]") {
  for (Quant4Type type : {Quant4Type::NF4, Quant4Type::FP4})
    for (int bs : {32, 64, 4096}) {
      const std::size_t n = 256 * 300 + 5;  // several nested blocks of 256, the last partial
      const auto x = gaussian(n, 11, 0.05f);
      const Quantized4bit q = quantize_4bit(x.data(), {std::int64_t(n)}, {type, bs, true});
      const Quantized4bit plain = quantize_4bit(x.data(), {std::int64_t(n)}, {type, bs, false});
      REQUIRE(q.packed == plain.packed);  // the codes do not depend on how absmax is stored
      REQUIRE(q.nested.codes.size() == plain.absmax.size());
      const auto absmax = decode_absmax(q);
      // 8-bit dynamic codes of (absmax - mean): error well under 1% of the largest absmax
      float worst = 0.0f, largest = 0.0f;
      for (std::size_t b = 0; b < absmax.size(); ++b) {
        worst = std::max(worst, std::fabs(absmax[b] - plain.absmax[b]));
        largest = std::max(largest, plain.absmax[b]);
      }
      REQUIRE(worst < 0.01f * largest);
      // decode = code * absmax2, rounded, then + offset, rounded
      for (std::size_t b = 0; b < absmax.size(); ++b) {
        const float scaled = q.nested.code[q.nested.codes[b]] * q.nested.absmax[b / 256];
        REQUIRE(float_bits(absmax[b]) == float_bits(scaled + q.offset));
      }
      std::vector<float> deq(n);
      dequantize(q, deq.data());
      for (std::size_t i = 0; i < n; i += 97) {
        const std::uint8_t c = (i % 2 == 0) ? q.packed[i / 2] >> 4 : q.packed[i / 2] & 0xf;
        REQUIRE(float_bits(deq[i]) == float_bits(decode_table(q)[c] * absmax[i / bs]));
      }
    }
}

TEST_CASE("4-bit quantization rejects bad input", "[quant]") {
  std::vector<float> x(100, 0.5f);
  x[42] = NAN;
  REQUIRE_THROWS_WITH(quantize_4bit(x.data(), {10, 10}, {}, "layers.0.q_proj.weight"),
                      Catch::Contains("layers.0.q_proj.weight: value 42 is nan"));
  x[42] = INFINITY;
  REQUIRE_THROWS_WITH(quantize_4bit(x.data(), {10, 10}, {}), Catch::Contains("value 42 is inf"));
  x[42] = 0.0f;
  REQUIRE_THROWS_WITH(quantize_4bit(x.data(), {10, 10}, {Quant4Type::NF4, 48, true}),
                      Catch::Contains("power of two in [32, 4096], got 48"));
  Quantized4bit q = quantize_4bit(x.data(), {10, 10}, {});
  q.nested.codes.pop_back();
  std::vector<float> out(100);
  REQUIRE_THROWS_WITH(dequantize(q, out.data()), Catch::Contains("absmax has 1 codes, expected 2"));
}
