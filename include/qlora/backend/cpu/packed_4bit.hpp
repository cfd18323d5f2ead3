#pragma once
// Packed4bit: an NF4 / FP4 weight (N, K) repacked for the CPU products.
//
// Layout (the "grouped" layout, used when K % 32 == 0)
// - Each row is cut into groups of 32 values; a group is 16 bytes where byte j holds value j in its
//   LOW nibble and value j + 16 in its HIGH nibble. One 16-byte load, a shift and two ANDs give the
//   32 codes of a group in order (low nibbles = values 0..15, high nibbles = 16..31), ready for a
//   32-entry pshufb lookup or for 8-lane permutes.
// - absmax stays per block of the flattened tensor (as bitsandbytes defines it), decoded once to
//   fp32 (double quantization undone at construction). Because 32 divides both K and the blocksize
//   (a power of two >= 32), a group never straddles a block, so a group's scale is
//   absmax[(row * K + 32 * g) >> log2(blocksize)], even when K % blocksize != 0 and blocks span
//   two rows.
// - When K % 32 != 0 the groups of a row would straddle blocks; such (small, odd) matrices keep
//   bitsandbytes' flattened packing (element 2j in the high nibble of byte j) and are decoded
//   value by value: the slow path, correct for any shape.
//
// Dequantized values are code[q] * absmax in fp32, bitwise what quant::dequantize gives.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/core/half.hpp"
#include "qlora/core/parallel.hpp"
#include "qlora/quant/blockwise4bit.hpp"

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace qlora {
namespace cpu {

constexpr std::int64_t kGroup = 32;  // values per 16-byte group of the grouped layout

struct Packed4bit {
  std::int64_t N = 0, K = 0;  // (out, in)
  int blocksize = 64;
  int log2_blocksize = 6;
  quant::Quant4Type type = quant::Quant4Type::NF4;
  bool grouped = false;             // K % 32 == 0: the grouped layout, else bitsandbytes' packing
  quant::Code16 table{};            // fp32 value of each code (decode_table: FP4 code 8 is -0.0)
  std::vector<std::uint8_t> codes;  // grouped: (N, K / 32, 16) bytes; else ((N * K + 1) / 2)
  std::vector<float> absmax;        // (blocks) over the flattened (N, K) tensor

  // The int8 image of the table for the int8-activation GEMV: i8[c] = round(table[c] * i8_scale),
  // |i8[c]| <= 127; a value decodes as i8[c] / i8_scale. i8_scale is chosen to minimise the
  // rounding error of the 16 entries (see table_scale).
  std::int8_t i8[16] = {};
  float i8_scale = 127.0f;
  // The int16 image for the int16-activation GEMV: i16[c] = round(table[c] * i16_scale) with
  // |i16[c]| <= 16383 (i16_scale from table_scale too) (so two pmaddwd sums against |x| <= 32767 fit an
  // int32), split into its low and high bytes for two pshufb lookups.
  std::uint8_t i16_lo[16] = {}, i16_hi[16] = {};
  float i16_scale = 16383.0f;

  std::size_t bytes() const { return codes.size() + absmax.size() * sizeof(float); }
  std::int64_t groups_per_row() const { return K / kGroup; }
  const std::uint8_t* row_codes(std::int64_t r) const { return codes.data() + r * (K / 2); }
  float group_absmax(std::int64_t r, std::int64_t g) const {
    return absmax[std::size_t((r * K + kGroup * g) >> log2_blocksize)];
  }
};

// The scale s in [0.75, 1] * qmax / max for which round(table * s) / s is closest to the
// table (sum of squared errors), so every |round(table * s)| <= qmax. For FP4 (multiples of 1/12
// except the smallest magnitude 1/192) this finds s = 120 at qmax = 127, where all but one entry
// are exact; for NF4 it roughly halves the error of s = qmax / max.
inline float table_scale(const quant::Code16& table, double qmax) {
  float amax = 0.0f;
  for (float v : table) amax = std::max(amax, std::fabs(v));
  if (amax == 0.0f) return 1.0f;
  const double hi = qmax / amax;
  double best = hi, best_err = 1e300;
  for (int i = 16384; i >= 0; --i) {  // steps of ~0.25 at qmax = 16383
    const double s = hi * (0.75 + 0.25 * i / 16384.0);
    double err = 0.0;
    for (float v : table) {
      const double d = std::nearbyint(v * s) / s - v;
      err += d * d;
    }
    if (err < best_err * (1.0 - 1e-9)) {
      best_err = err;
      best = s;
    }
  }
  return float(best);
}

inline Packed4bit pack_4bit(const quant::Quantized4bit& q) {
  quant::validate(q, "QMatrix::from(Quantized4bit)");
  QLORA_CHECK(q.shape.size() == 2, "QMatrix::from(Quantized4bit): weight must be 2-D (out, in), got ",
              q.shape.size(), " dimensions");
  Packed4bit p;
  p.N = q.shape[0];
  p.K = q.shape[1];
  p.blocksize = q.blocksize;
  p.log2_blocksize = 0;
  while ((1 << p.log2_blocksize) < q.blocksize) ++p.log2_blocksize;
  p.type = q.type;
  p.table = quant::decode_table(q);
  p.absmax = quant::decode_absmax(q);
  p.i8_scale = table_scale(p.table, 127.0);
  for (int c = 0; c < 16; ++c) p.i8[c] = std::int8_t(std::nearbyint(p.table[c] * p.i8_scale));
  p.i16_scale = table_scale(p.table, 16383.0);
  for (int c = 0; c < 16; ++c) {
    const auto v = std::uint16_t(std::int16_t(std::nearbyint(p.table[c] * p.i16_scale)));
    p.i16_lo[c] = std::uint8_t(v & 0xff);
    p.i16_hi[c] = std::uint8_t(v >> 8);
  }
  p.grouped = p.K % kGroup == 0;
  if (!p.grouped) {
    p.codes = q.packed;
    return p;
  }
  const std::int64_t N = p.N, K = p.K, G = K / kGroup;
  p.codes.resize(std::size_t(N * K / 2));
  auto code_at = [&](std::int64_t e) {  // bitsandbytes packing: element 2j in the high nibble
    const std::uint8_t b = q.packed[std::size_t(e / 2)];
    return std::uint8_t(e % 2 == 0 ? b >> 4 : b & 0xf);
  };
  parallel_for(std::size_t(N), 1,
               std::size_t(std::max<std::int64_t>(1, 65536 / std::max<std::int64_t>(K, 1))),
               [&](std::size_t r0, std::size_t r1) {
                 for (std::int64_t r = std::int64_t(r0); r < std::int64_t(r1); ++r)
                   for (std::int64_t g = 0; g < G; ++g) {
                     const std::int64_t e = r * K + g * kGroup;
                     std::uint8_t* out = p.codes.data() + r * (K / 2) + g * 16;
                     for (int j = 0; j < 16; ++j)
                       out[j] = std::uint8_t(code_at(e + j) | code_at(e + 16 + j) << 4);
                   }
               });
  return p;
}

#ifdef __AVX2__
namespace detail {

// The 32 codes of one group, as bytes in element order (low 128-bit lane: values 0..15). The
// 16 bytes are broadcast to both lanes by the load itself and the high lane shifted by 4: no
// shuffle-port instruction, which the lookups that follow need.
inline __m256i load_group_codes(const std::uint8_t* g) {
  const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g)));
  return _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)),
                          _mm256_set1_epi8(0x0f));
}

// The 16-entry fp32 table as two 8-lane halves; code[idx] = permute both halves, pick by bit 3.
struct Table16 {
  __m256 lo, hi;
  explicit Table16(const quant::Code16& t)
      : lo(_mm256_loadu_ps(t.data())), hi(_mm256_loadu_ps(t.data() + 8)) {}
  // 8 codes in the low byte of each int32 lane (higher bits zero) -> 8 fp32 values
  __m256 lookup(__m256i idx) const {
    const __m256 pick = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx), pick);
  }
};

// One group's 32 dequantized values (code * absmax, exactly as quant::dequantize) into w[0..3].
inline void decode_group(const Table16& t, const std::uint8_t* g, __m256 amax, __m256 w[4]) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(g));
  const __m128i nib = _mm_set1_epi8(0x0f);
  const __m128i lo = _mm_and_si128(v, nib), hi = _mm_and_si128(_mm_srli_epi16(v, 4), nib);
  w[0] = _mm256_mul_ps(t.lookup(_mm256_cvtepu8_epi32(lo)), amax);
  w[1] = _mm256_mul_ps(t.lookup(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), amax);
  w[2] = _mm256_mul_ps(t.lookup(_mm256_cvtepu8_epi32(hi)), amax);
  w[3] = _mm256_mul_ps(t.lookup(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), amax);
}

// The fp32 table as four byte planes for pshufb: one group's 32 values come out of 4 pshufb and 8
// unpacks, all in-lane shuffles (2 per cycle on Zen; an 8-lane vpermps is slower, 3 uops on Zen 1),
// in the "plane order" of permute_group_order: vector i holds values 4i..4i+3 (low lane) and
// 16+4i..16+4i+3 (high lane). The activations are permuted to match once per call.
struct Planes16 {
  __m256i b[4];
  explicit Planes16(const quant::Code16& t) {
    alignas(16) std::uint8_t plane[4][16];
    for (int c = 0; c < 16; ++c) {
      const std::uint32_t u = float_bits(t[std::size_t(c)]);
      for (int k = 0; k < 4; ++k) plane[k][c] = std::uint8_t(u >> (8 * k));
    }
    for (int k = 0; k < 4; ++k)
      b[k] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(plane[k])));
  }
  // one group's 32 values (fp32 code values, not yet scaled) in plane order
  void decode(const std::uint8_t* g, __m256 w[4]) const {
    const __m256i c = load_group_codes(g);
    const __m256i b0 = _mm256_shuffle_epi8(b[0], c), b1 = _mm256_shuffle_epi8(b[1], c);
    const __m256i b2 = _mm256_shuffle_epi8(b[2], c), b3 = _mm256_shuffle_epi8(b[3], c);
    const __m256i l01 = _mm256_unpacklo_epi8(b0, b1), h01 = _mm256_unpackhi_epi8(b0, b1);  // low halves
    const __m256i l23 = _mm256_unpacklo_epi8(b2, b3), h23 = _mm256_unpackhi_epi8(b2, b3);  // high halves
    w[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23));  // values 0..3 | 16..19
    w[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23));  // 4..7 | 20..23
    w[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23));  // 8..11 | 24..27
    w[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23));  // 12..15 | 28..31
  }
};

}  // namespace detail
#endif

// Position j of a group in plane order (Planes16) holds value plane_order(j) of the group.
constexpr int plane_order(int j) { return (j / 8) * 4 + (j % 8 >= 4 ? 16 : 0) + j % 4; }

// x (M, K) -> out (M, K) with every group of 32 in plane order, K % 32 == 0.
inline void permute_group_order(const float* x, std::int64_t M, std::int64_t K, float* out) {
  for (std::int64_t i = 0; i < M * K; i += kGroup)
    for (int j = 0; j < kGroup; ++j) out[i + j] = x[i + plane_order(j)];
}

// Dequantizes rows [r0, r1), columns [c0, c1) into out (r1 - r0, c1 - c0) with row stride ld.
// In the grouped layout c0 must be a multiple of 32 (any c1).
inline void dequantize_tile(const Packed4bit& p, std::int64_t r0, std::int64_t r1, std::int64_t c0,
                            std::int64_t c1, float* out, std::int64_t ld) {
  const std::int64_t K = p.K;
  if (!p.grouped) {
    for (std::int64_t r = r0; r < r1; ++r)
      for (std::int64_t c = c0; c < c1; ++c) {
        const std::int64_t e = r * K + c;
        const std::uint8_t b = p.codes[std::size_t(e / 2)];
        const std::uint8_t q = e % 2 == 0 ? b >> 4 : b & 0xf;
        out[(r - r0) * ld + (c - c0)] = p.table[q] * p.absmax[std::size_t(e >> p.log2_blocksize)];
      }
    return;
  }
  QLORA_CHECK(c0 % kGroup == 0, "dequantize_tile: first column ", c0, " is not a multiple of ", kGroup);
  for (std::int64_t r = r0; r < r1; ++r) {
    const std::uint8_t* rc = p.row_codes(r);
    float* o = out + (r - r0) * ld - c0;  // o[c] is column c
    std::int64_t g = c0 / kGroup;
#ifdef __AVX2__
    const detail::Table16 t(p.table);
    for (; (g + 1) * kGroup <= c1; ++g) {
      __m256 w[4];
      detail::decode_group(t, rc + 16 * g, _mm256_set1_ps(p.group_absmax(r, g)), w);
      for (int i = 0; i < 4; ++i) _mm256_storeu_ps(o + g * kGroup + 8 * i, w[i]);
    }
#endif
    for (std::int64_t c = g * kGroup; c < c1; ++c) {
      const std::int64_t gi = c / kGroup, j = c % kGroup;
      const std::uint8_t b = rc[gi * 16 + (j & 15)];
      const std::uint8_t q = j < 16 ? b & 0xf : b >> 4;
      o[c] = p.table[q] * p.group_absmax(r, gi);
    }
  }
}

}  // namespace cpu
}  // namespace qlora
