#pragma once
// ActQuant: how the small-M fused products treat the activations.
//
// - None: fp32 activations times the exactly dequantized weight (code * absmax) with fp32 FMAs.
//   Equal to the reference up to fp32 summation order (relative error ~1e-7).
// - Int8: the llama.cpp-style integer dot product. Activations are quantized to int8 per group of
//   32 values (scale max|x| / 127, round to nearest even), the 4-bit codes are looked up in a
//   16-entry int8 image of the code table with one pshufb per 32 weights, and each group's integer
//   dot product (maddubs + madd) is scaled in fp32 by the group's absmax and activation scale. Both
//   roundings add error: relative error 5e-3..7e-3 on Gaussian activations, ~1e-2 on heavy-tailed
//   ones and more with outliers (tests/test_qmatrix.cpp, docs/performance.md), against ~0.09 of NF4
//   itself. The fastest path, and memory-bound at M = 1 on 2 cores.
// - Int16 (4-bit weights only; int8 weights compute as None): activations quantized to int16 per
//   group of 32 (scale max|x| / 32767), the codes looked up as int16 (two pshufb on the table's
//   byte planes, |w| <= 16383) and multiplied with pmaddwd. Relative error 2e-5..5e-5, with
//   Gaussian, heavy-tailed or outlier-laden activations alike (an outlier 50x the rest leaves its
//   group ~9 bits, not ~1.5), at about the speed of Int8 (one more pshufb and unpacks per 32).
#include <cmath>
#include <cstdint>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace qlora {
namespace cpu {

enum class ActQuant : std::uint8_t { None, Int8, Int16 };

// Activations x (M, K), K % 32 == 0, quantized per group of 32: xq (M, K) int8 and xs (M, K / 32),
// with x ~= xq * xs. A group of zeros gets scale 0 and codes 0.
inline void quantize_act_int8(const float* x, std::int64_t M, std::int64_t K, std::int8_t* xq, float* xs) {
  const std::int64_t G = K / 32;
  for (std::int64_t m = 0; m < M; ++m)
    for (std::int64_t g = 0; g < G; ++g) {
      const float* v = x + m * K + 32 * g;
      std::int8_t* q = xq + m * K + 32 * g;
      float amax = 0.0f;
      for (int i = 0; i < 32; ++i) amax = std::fmax(amax, std::fabs(v[i]));
      const float d = amax / 127.0f;
      const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      xs[m * G + g] = d;
#ifdef __AVX2__
      const __m256 vinv = _mm256_set1_ps(inv);
      __m256i i32[4];
      for (int k = 0; k < 4; ++k)
        i32[k] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + 8 * k), vinv));
      // packs work per 128-bit lane; the permute puts the 32 bytes back in element order
      const __m256i w01 = _mm256_packs_epi32(i32[0], i32[1]), w23 = _mm256_packs_epi32(i32[2], i32[3]);
      const __m256i b = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w01, w23),
                                                    _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), b);
#else
      for (int i = 0; i < 32; ++i) q[i] = std::int8_t(std::nearbyint(v[i] * inv));
#endif
    }
}

// The same for int16, groups of 32 stored in the order the int16 weights come out of their
// unpacks: [x0..x7, x16..x23, x8..x15, x24..x31] (unpacklo / unpackhi of the two byte planes work
// per 128-bit lane).
inline void quantize_act_int16(const float* x, std::int64_t M, std::int64_t K, std::int16_t* xq, float* xs) {
  const std::int64_t G = K / 32;
  static constexpr int kOrder[32] = {0, 1, 2,  3,  4,  5,  6,  7,  16, 17, 18, 19, 20, 21, 22, 23,
                                     8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  for (std::int64_t m = 0; m < M; ++m)
    for (std::int64_t g = 0; g < G; ++g) {
      const float* v = x + m * K + 32 * g;
      std::int16_t* q = xq + m * K + 32 * g;
      float amax = 0.0f;
      for (int i = 0; i < 32; ++i) amax = std::fmax(amax, std::fabs(v[i]));
      const float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
      xs[m * G + g] = amax / 32767.0f;
      for (int i = 0; i < 32; ++i)
        q[i] = std::int16_t(std::max(-32767.0f, std::min(32767.0f, std::nearbyint(v[kOrder[i]] * inv))));
    }
}

}  // namespace cpu
}  // namespace qlora
