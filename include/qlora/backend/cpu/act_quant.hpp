#pragma once
// ActQuant: how the small-M fused products treat the activations.
//
// - None: fp32 activations times the exactly dequantized weight (code * absmax) with fp32 FMAs.
//   Equal to the reference up to fp32 summation order (relative error ~1e-7).
// - Int8: the llama.cpp-style integer dot product. Activations are quantized to int8 per group of
//   32 values (scale max|x| / 127, round to nearest even), the 4-bit codes are looked up in a
//   16-entry int8 image of the code table with one pshufb per 32 weights, and each group's integer
//   dot product (maddubs + madd) is scaled in fp32 by the group's absmax and activation scale. Both
//   roundings add error: relative error ~3e-3 on Gaussian data (see tests/test_qmatrix.cpp and
//   docs/performance.md), against ~0.09 of NF4 itself.
#include <cmath>
#include <cstdint>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace qlora {
namespace cpu {

enum class ActQuant : bool { None, Int8 };

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

}  // namespace cpu
}  // namespace qlora
