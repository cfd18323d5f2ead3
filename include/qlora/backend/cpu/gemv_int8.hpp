#pragma once
// Fused small-M forward product with a row-wise int8 weight (quant/rowwise_int8.hpp):
//
//   y (M, N) (+)= x (M, K) . W^T,   W[n, k] = (q[n, k] * SCB[n]) * (1/127)
//
// The row scale is applied once per output, after the dot product over the row's int8 codes:
// y[m, n] = (sum_k q[n, k] * x[m, k]) * (SCB[n] / 127). That differs from the reference (which
// rounds every weight) only at fp32 rounding level.
// - fp32 activations: 8 codes sign-extended to int32, converted, FMA (any K; a scalar tail).
// - int8 activations (ActQuant::Int8, K % 32 == 0): |q| times sign-adjusted int8 activations with
//   maddubs + madd per group of 32, scaled by the group's activation scale.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "qlora/backend/cpu/accumulate.hpp"
#include "qlora/backend/cpu/act_quant.hpp"
#include "qlora/backend/cpu/gemv_common.hpp"
#include "qlora/quant/rowwise_int8.hpp"

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace qlora {
namespace cpu {

// A row-wise int8 weight as the kernels see it.
struct Int8View {
  const std::int8_t* q;  // (N, K)
  const float* scb;      // (N)
  std::int64_t N, K;
};

#ifdef __AVX2__
namespace detail {

template <int MC>
void gemv8_f32_rows(const Int8View& w, const float* x, std::int64_t r0, std::int64_t r1, float* y,
                    std::int64_t ldy, Accumulate acc) {
  const std::int64_t K = w.K;
  for (std::int64_t r = r0; r < r1; ++r) {
    const std::int8_t* q = w.q + r * K;
    __m256 a0[MC], a1[MC];
    for (int m = 0; m < MC; ++m) a0[m] = a1[m] = _mm256_setzero_ps();
    std::int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      const __m256 w0 =
          _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k))));
      const __m256 w1 = _mm256_cvtepi32_ps(
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k + 8))));
      for (int m = 0; m < MC; ++m) {
        a0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), a0[m]);
        a1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), a1[m]);
      }
    }
    const float s = w.scb[r] * quant::kInv127;
    for (int m = 0; m < MC; ++m) {
      float t = hsum(_mm256_add_ps(a0[m], a1[m]));
      for (std::int64_t kk = k; kk < K; ++kk) t += float(q[kk]) * x[m * K + kk];
      store_out(y + m * ldy + r, t * s, acc);
    }
  }
}

template <int MC>
void gemv8_i8_rows(const Int8View& w, const std::int8_t* xq, const float* xs, std::int64_t r0,
                   std::int64_t r1, float* y, std::int64_t ldy, Accumulate acc) {
  const std::int64_t K = w.K, G = K / 32;
  const __m256i ones = _mm256_set1_epi16(1);
  for (std::int64_t r = r0; r < r1; ++r) {
    const std::int8_t* q = w.q + r * K;
    __m256 a[MC];
    for (int m = 0; m < MC; ++m) a[m] = _mm256_setzero_ps();
    for (std::int64_t g = 0; g < G; ++g) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * g));
      const __m256i aw = _mm256_sign_epi8(wv, wv);
      for (int m = 0; m < MC; ++m) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + 32 * g));
        const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wv)), ones);
        a[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_broadcast_ss(xs + m * G + g), a[m]);
      }
    }
    const float s = w.scb[r] * quant::kInv127;
    for (int m = 0; m < MC; ++m) store_out(y + m * ldy + r, hsum(a[m]) * s, acc);
  }
}

template <int MC>
struct Int8F32Kernel {
  template <class... A>
  static void run(A&&... a) {
    gemv8_f32_rows<MC>(a...);
  }
};
template <int MC>
struct Int8I8Kernel {
  template <class... A>
  static void run(A&&... a) {
    gemv8_i8_rows<MC>(a...);
  }
};

}  // namespace detail

// y (M, N) (+)= x (M, K) . W^T. ActQuant::Int8 needs K % 32 == 0 (else fp32 activations are used).
inline void gemv_int8(const Int8View& w, const float* x, std::int64_t M, float* y, Accumulate acc,
                      ActQuant aq) {
  const std::int64_t N = w.N, K = w.K;
  if (M == 0 || N == 0) return;
  const bool i8 = aq == ActQuant::Int8 && K % 32 == 0;
  std::vector<std::int8_t> xq;
  std::vector<float> xs;
  if (i8) {
    xq.resize(std::size_t(M * K));
    xs.resize(std::size_t(M * (K / 32)));
    quantize_act_int8(x, M, K, xq.data(), xs.data());
  }
  const std::int64_t min_rows = std::max<std::int64_t>(8, 131072 / std::max<std::int64_t>(K, 1));
  detail::gemv_rows(N, M, min_rows, [&](std::int64_t m0, int mc, std::int64_t r0, std::int64_t r1) {
    if (i8)
      detail::for_chunk<detail::Int8I8Kernel>(mc, w, xq.data() + m0 * K, xs.data() + m0 * (K / 32), r0, r1,
                                              y + m0 * N, N, acc);
    else
      detail::for_chunk<detail::Int8F32Kernel>(mc, w, x + m0 * K, r0, r1, y + m0 * N, N, acc);
  });
}
#endif

}  // namespace cpu
}  // namespace qlora
