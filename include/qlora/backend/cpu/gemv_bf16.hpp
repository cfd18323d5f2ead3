#pragma once
// Fused small-M forward product with a dense bf16 weight: y (M, N) (+)= x (M, K) . W^T.
// A bf16 value is the top half of an fp32 one, so 8 weights widen to fp32 with a zero-extend and a
// 16-bit shift, exactly; then fp32 FMAs. Any K (a scalar tail).
#include <algorithm>
#include <cstdint>

#include "qlora/backend/cpu/accumulate.hpp"
#include "qlora/backend/cpu/gemv_common.hpp"
#include "qlora/core/half.hpp"

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace qlora {
namespace cpu {

#ifdef __AVX2__
namespace detail {

inline __m256 load_bf16x8(const bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <int MC>
void gemv_bf16_rows(const bf16* W, std::int64_t K, const float* x, std::int64_t r0, std::int64_t r1, float* y,
                    std::int64_t ldy, Accumulate acc) {
  for (std::int64_t r = r0; r < r1; ++r) {
    const bf16* wr = W + r * K;
    __m256 a0[MC], a1[MC];
    for (int m = 0; m < MC; ++m) a0[m] = a1[m] = _mm256_setzero_ps();
    std::int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      const __m256 w0 = load_bf16x8(wr + k), w1 = load_bf16x8(wr + k + 8);
      for (int m = 0; m < MC; ++m) {
        a0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), a0[m]);
        a1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), a1[m]);
      }
    }
    for (int m = 0; m < MC; ++m) {
      float t = hsum(_mm256_add_ps(a0[m], a1[m]));
      for (std::int64_t kk = k; kk < K; ++kk) t += to_float(wr[kk]) * x[m * K + kk];
      store_out(y + m * ldy + r, t, acc);
    }
  }
}

template <int MC>
struct Bf16Kernel {
  template <class... A>
  static void run(A&&... a) {
    gemv_bf16_rows<MC>(a...);
  }
};

}  // namespace detail

// W (N, K) bf16, x (M, K), y (M, N)
inline void gemv_bf16(const bf16* W, std::int64_t N, std::int64_t K, const float* x, std::int64_t M, float* y,
                      Accumulate acc) {
  if (M == 0 || N == 0) return;
  const std::int64_t min_rows = std::max<std::int64_t>(8, 65536 / std::max<std::int64_t>(K, 1));
  detail::gemv_rows(N, M, min_rows, [&](std::int64_t m0, int mc, std::int64_t r0, std::int64_t r1) {
    detail::for_chunk<detail::Bf16Kernel>(mc, W, K, x + m0 * K, r0, r1, y + m0 * N, N, acc);
  });
}
#endif

}  // namespace cpu
}  // namespace qlora
