#pragma once
// bf16 and fp16 storage types and their conversions to and from fp32.
//
// Conventions
// - fp32 -> bf16/fp16 rounds to nearest, ties to even (what PyTorch, safetensors writers and the
//   F16C instruction do). NaN stays NaN with its sign, made quiet, payload truncated to the top
//   bits; +-inf stays inf; fp32 values past the largest finite fp16 round to inf.
// - bf16/fp16 -> fp32 is exact.
// - The scalar functions are the reference; the bulk converters (convert_*) take an AVX2/F16C
//   path when compiled for it and are tested against the scalar ones over every bit pattern.
#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#define QLORA_HALF_SIMD 1
#endif

namespace qlora {

struct bf16 {
  std::uint16_t bits;
};
struct fp16 {
  std::uint16_t bits;
};

inline std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// --- bf16 ---------------------------------------------------------------------------------------
inline float to_float(bf16 h) { return bits_float(std::uint32_t(h.bits) << 16); }

inline bf16 to_bf16(float f) {
  std::uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u)  // NaN: keep sign and top payload, force quiet
    return bf16{std::uint16_t((u >> 16) | 0x0040u)};
  // Round to nearest even: add 0x7fff plus the lowest kept bit, then truncate. Overflow of the
  // mantissa carries into the exponent, which is exactly the right result (up to inf).
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{std::uint16_t(u >> 16)};
}

// --- fp16 ---------------------------------------------------------------------------------------
inline float to_float(fp16 h) {
  const std::uint32_t sign = std::uint32_t(h.bits & 0x8000u) << 16;
  const std::uint32_t exp = (h.bits >> 10) & 0x1fu;
  const std::uint32_t mant = h.bits & 0x3ffu;
  if (exp == 0x1f)  // inf, or NaN made quiet (as F16C's vcvtph2ps does)
    return bits_float(sign | 0x7f800000u | (mant ? 0x400000u : 0u) | (mant << 13));
  if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
  // zero or subnormal: mant * 2^-24, exact in fp32
  const float mag = float(mant) * bits_float(0x33800000u);  // 2^-24
  return bits_float(sign | float_bits(mag));
}

inline fp16 to_fp16(float f) {
  std::uint32_t u = float_bits(f);
  const std::uint16_t sign = std::uint16_t((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u)  // NaN: quiet, payload truncated (as F16C does)
    return fp16{std::uint16_t(sign | 0x7e00u | ((u >> 13) & 0x3ffu))};
  if (u >= 0x47800000u)  // >= 2^16: inf (values in [65520, 65536) round up to inf below too)
    return fp16{std::uint16_t(sign | 0x7c00u)};
  if (u < 0x38800000u) {
    // Below the smallest normal fp16 (2^-14): let the FPU round to a multiple of 2^-24 by adding
    // 0.5 (whose ulp is 2^-24), then the low mantissa bits are the fp16 subnormal.
    const float magic = 0.5f;
    const float r = bits_float(u) + magic;
    return fp16{std::uint16_t(sign | (float_bits(r) - float_bits(magic)))};
  }
  const std::uint32_t odd = (u >> 13) & 1u;
  u += (std::uint32_t(15 - 127) << 23) + 0xfffu + odd;  // rebias, round to nearest even
  return fp16{std::uint16_t(sign | (u >> 13))};
}

// --- bulk conversions ----------------------------------------------------------------------------
inline void convert(const bf16* in, float* out, std::size_t n) {
  std::size_t i = 0;
#ifdef QLORA_HALF_SIMD
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
    _mm256_storeu_ps(out + i, _mm256_castsi256_ps(w));
  }
#endif
  for (; i < n; ++i) out[i] = to_float(in[i]);
}

#ifdef QLORA_HALF_SIMD
// 8 fp32 lanes -> 8 bf16 (round to nearest even, NaN kept quiet), the SIMD twin of to_bf16().
inline __m128i to_bf16_x8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff);
  const __m256i rounded =
      _mm256_add_epi32(u, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(u, 16), one)));
  const __m256i is_nan =
      _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
  __m256i r = _mm256_blendv_epi8(rounded, _mm256_or_si256(u, _mm256_set1_epi32(0x00400000)), is_nan);
  r = _mm256_srli_epi32(r, 16);
  // pack 8 x u32 (each < 2^16) to 8 x u16; packus works per 128-bit lane, so pack the two halves
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
#endif

inline void convert(const float* in, bf16* out, std::size_t n) {
  std::size_t i = 0;
#ifdef QLORA_HALF_SIMD
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), to_bf16_x8(_mm256_loadu_ps(in + i)));
#endif
  for (; i < n; ++i) out[i] = to_bf16(in[i]);
}

inline void convert(const fp16* in, float* out, std::size_t n) {
  std::size_t i = 0;
#ifdef QLORA_HALF_SIMD
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
#endif
  for (; i < n; ++i) out[i] = to_float(in[i]);
}

inline void convert(const float* in, fp16* out, std::size_t n) {
  std::size_t i = 0;
#ifdef QLORA_HALF_SIMD
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) out[i] = to_fp16(in[i]);
}

inline void convert(const float* in, float* out, std::size_t n) {
  if (in != out) std::memcpy(out, in, n * sizeof(float));
}

#ifdef QLORA_HALF_SIMD
// Store 8 fp32 lanes as float / bf16 / fp16 (round to nearest even), for vectorized dequantizers.
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(fp16* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void store8(bf16* p, __m256 v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16_x8(v)); }
#endif

// Element-wise store of one fp32 value into any supported output type (used by dequantizers).
inline void store(float v, float* p) { *p = v; }
inline void store(float v, bf16* p) { *p = to_bf16(v); }
inline void store(float v, fp16* p) { *p = to_fp16(v); }

}  // namespace qlora
