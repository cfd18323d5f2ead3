#pragma once
// Fused small-M forward product with a 4-bit weight in the grouped layout (packed_4bit.hpp):
//
//   y (M, N) (+)= x (M, K) . W^T,   M small (1 .. ~16), K % 32 == 0
//
// The packed codes are read once, straight from the repacked weight; rows of W are split over
// threads, so each thread streams a disjoint part of the weight and writes disjoint columns of y.
// Within a row, the activations of up to kMaxChunk rows of x are kept in flight together, so a
// group's codes are decoded once for all of them.
//
// Three kernels (act_quant.hpp says which the caller picked):
// - fp32: a group's 32 codes -> fp32 values by pshufb on the table's four byte planes and two
//   rounds of unpacks (Planes16), times the block's absmax (exactly the dequantized weight), then
//   FMAs with fp32 activations permuted once per call into the same order.
// - int8: one pshufb turns 32 codes into int8 weights; |w| (unsigned) times sign-adjusted int8
//   activations with maddubs, pairs summed by madd into 8 int32 lanes, converted and scaled by
//   absmax * activation scale. |w|, |x| <= 127, so maddubs' int16 pair sums (<= 32258) never
//   saturate.
// - int16: two pshufb on the int16 table's byte planes and two unpacks give 32 int16 weights;
//   pmaddwd against int16 activations, scaled like int8.
// All are AVX2 + FMA only (the project's reference machine has no AVX-512).
#include <algorithm>
#include <cstdint>
#include <vector>

#include "qlora/backend/cpu/accumulate.hpp"
#include "qlora/backend/cpu/act_quant.hpp"
#include "qlora/backend/cpu/gemv_common.hpp"
#include "qlora/backend/cpu/packed_4bit.hpp"
#include "qlora/core/parallel.hpp"

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace qlora {
namespace cpu {

#ifdef __AVX2__
namespace detail {

// One row of W against one row of x: the absmax multiply moves out of the inner loop, once per
// block (per run of groups sharing a block) instead of once per 8 weights.
inline void gemv4_f32_rows_m1(const Packed4bit& p, const float* x, std::int64_t r0, std::int64_t r1, float* y,
                              Accumulate acc) {
  const std::int64_t K = p.K, G = K / kGroup;
  const Planes16 planes(p.table);
  for (std::int64_t r = r0; r < r1; ++r) {
    const std::uint8_t* rc = p.row_codes(r);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (std::int64_t g = 0; g < G;) {
      // groups [g, ge) lie in block b (a row may start or end inside a block)
      const std::int64_t e = r * K + kGroup * g, b = e >> p.log2_blocksize;
      const std::int64_t ge = std::min(G, g + (((b + 1) << p.log2_blocksize) - e) / kGroup);
      __m256 t0 = _mm256_setzero_ps(), t1 = _mm256_setzero_ps();
      for (; g < ge; ++g) {
        __m256 w[4];
        planes.decode(rc + 16 * g, w);
        const float* xg = x + kGroup * g;
        t0 = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xg), t0);
        t1 = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xg + 8), t1);
        t0 = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xg + 16), t0);
        t1 = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xg + 24), t1);
      }
      const __m256 amax = _mm256_set1_ps(p.absmax[std::size_t(b)]);
      a0 = _mm256_fmadd_ps(t0, amax, a0);
      a1 = _mm256_fmadd_ps(t1, amax, a1);
    }
    store_out(y + r, hsum(_mm256_add_ps(a0, a1)), acc);
  }
}

// Rows [r0, r1) of W against MC rows of x (row stride K): y[m * ldy + r].
template <int MC>
void gemv4_f32_rows(const Packed4bit& p, const float* x, std::int64_t r0, std::int64_t r1, float* y,
                    std::int64_t ldy, Accumulate acc) {
  const std::int64_t K = p.K, G = K / kGroup;
  const Planes16 planes(p.table);
  for (std::int64_t r = r0; r < r1; ++r) {
    const std::uint8_t* rc = p.row_codes(r);
    // two accumulators per activation row hide the FMA latency when MC is small
    __m256 a0[MC], a1[MC];
    for (int m = 0; m < MC; ++m) a0[m] = a1[m] = _mm256_setzero_ps();
    for (std::int64_t g = 0; g < G; ++g) {
      __m256 w[4];
      planes.decode(rc + 16 * g, w);
      const __m256 amax = _mm256_set1_ps(p.group_absmax(r, g));
      for (int i = 0; i < 4; ++i) w[i] = _mm256_mul_ps(w[i], amax);  // exactly the dequantized weight
      for (int m = 0; m < MC; ++m) {
        const float* xm = x + m * K + kGroup * g;
        a0[m] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xm), a0[m]);
        a1[m] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xm + 8), a1[m]);
        a0[m] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xm + 16), a0[m]);
        a1[m] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xm + 24), a1[m]);
      }
    }
    for (int m = 0; m < MC; ++m) store_out(y + m * ldy + r, hsum(_mm256_add_ps(a0[m], a1[m])), acc);
  }
}

// Rows [r0, r1) of W against MC rows of int8 activations xq (row stride K), scales xs (row stride G).
template <int MC>
void gemv4_i8_rows(const Packed4bit& p, const std::int8_t* xq, const float* xs, std::int64_t r0,
                   std::int64_t r1, float* y, std::int64_t ldy, Accumulate acc) {
  const std::int64_t K = p.K, G = K / kGroup;
  const __m256i tab = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.i8)));
  const __m256i ones = _mm256_set1_epi16(1);
  const float inv_scale = 1.0f / p.i8_scale;
  for (std::int64_t r = r0; r < r1; ++r) {
    const std::uint8_t* rc = p.row_codes(r);
    __m256 a[MC];
    for (int m = 0; m < MC; ++m) a[m] = _mm256_setzero_ps();
    for (std::int64_t g = 0; g < G; ++g) {
      const __m256i w = _mm256_shuffle_epi8(tab, load_group_codes(rc + 16 * g));  // 32 int8 weights
      const __m256i aw = _mm256_sign_epi8(w, w);                                  // |w|
      const __m256 amax = _mm256_set1_ps(p.group_absmax(r, g));
      for (int m = 0; m < MC; ++m) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + kGroup * g));
        const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, w)), ones);
        const __m256 scale = _mm256_mul_ps(amax, _mm256_broadcast_ss(xs + m * G + g));
        a[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, a[m]);
      }
    }
    for (int m = 0; m < MC; ++m) store_out(y + m * ldy + r, hsum(a[m]) * inv_scale, acc);
  }
}

// Rows [r0, r1) of W against MC rows of int16 activations xq (row stride K, groups in the order of
// quantize_act_int16), scales xs (row stride G). |w| <= 16383 and |x| <= 32767: each pmaddwd lane
// is at most 2 * 16383 * 32767 and the sum of two at most 2,147,287,044 < 2^31.
template <int MC>
void gemv4_i16_rows(const Packed4bit& p, const std::int16_t* xq, const float* xs, std::int64_t r0,
                    std::int64_t r1, float* y, std::int64_t ldy, Accumulate acc) {
  const std::int64_t K = p.K, G = K / kGroup;
  const __m256i tlo =
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.i16_lo)));
  const __m256i thi =
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.i16_hi)));
  const float inv_scale = 1.0f / p.i16_scale;
  for (std::int64_t r = r0; r < r1; ++r) {
    const std::uint8_t* rc = p.row_codes(r);
    __m256 a[MC];
    for (int m = 0; m < MC; ++m) a[m] = _mm256_setzero_ps();
    for (std::int64_t g = 0; g < G; ++g) {
      const __m256i c = load_group_codes(rc + 16 * g);
      const __m256i lo = _mm256_shuffle_epi8(tlo, c), hi = _mm256_shuffle_epi8(thi, c);
      const __m256i w0 = _mm256_unpacklo_epi8(lo, hi);  // int16 weights 0..7 | 16..23
      const __m256i w1 = _mm256_unpackhi_epi8(lo, hi);  // 8..15 | 24..31
      const __m256 amax = _mm256_set1_ps(p.group_absmax(r, g));
      for (int m = 0; m < MC; ++m) {
        const __m256i* xv = reinterpret_cast<const __m256i*>(xq + m * K + kGroup * g);
        const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(xv)),
                                             _mm256_madd_epi16(w1, _mm256_loadu_si256(xv + 1)));
        const __m256 scale = _mm256_mul_ps(amax, _mm256_broadcast_ss(xs + m * G + g));
        a[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, a[m]);
      }
    }
    for (int m = 0; m < MC; ++m) store_out(y + m * ldy + r, hsum(a[m]) * inv_scale, acc);
  }
}

template <int MC>
struct I16Kernel {
  template <class... A>
  static void run(A&&... a) {
    gemv4_i16_rows<MC>(a...);
  }
};

template <int MC>
struct F32Kernel {
  template <class... A>
  static void run(A&&... a) {
    gemv4_f32_rows<MC>(a...);
  }
};
template <>
struct F32Kernel<1> {
  static void run(const Packed4bit& p, const float* x, std::int64_t r0, std::int64_t r1, float* y,
                  std::int64_t, Accumulate acc) {
    gemv4_f32_rows_m1(p, x, r0, r1, y, acc);
  }
};
template <int MC>
struct I8Kernel {
  template <class... A>
  static void run(A&&... a) {
    gemv4_i8_rows<MC>(a...);
  }
};

}  // namespace detail

// y (M, N) (+)= x (M, K) . W^T. Needs p.grouped (K % 32 == 0).
inline void gemv_4bit(const Packed4bit& p, const float* x, std::int64_t M, float* y, Accumulate acc,
                      ActQuant aq) {
  const std::int64_t N = p.N, K = p.K, G = K / kGroup;
  if (M == 0 || N == 0) return;
  std::vector<std::int8_t> xq;
  std::vector<std::int16_t> xq16;
  std::vector<float> xs, xp;
  if (aq == ActQuant::Int16) {
    xq16.resize(std::size_t(M * K));
    xs.resize(std::size_t(M * G));
    quantize_act_int16(x, M, K, xq16.data(), xs.data());
  } else if (aq == ActQuant::Int8) {
    xq.resize(std::size_t(M * K));
    xs.resize(std::size_t(M * G));
    quantize_act_int8(x, M, K, xq.data(), xs.data());
  } else {
    xp.resize(std::size_t(M * K));  // x in the plane order the fp32 decode produces
    permute_group_order(x, M, K, xp.data());
    x = xp.data();
  }
  // at least ~128 KiB of codes per thread
  const std::int64_t min_rows = std::max<std::int64_t>(8, 262144 / std::max<std::int64_t>(K, 1));
  detail::gemv_rows(N, M, min_rows, [&](std::int64_t m0, int mc, std::int64_t r0, std::int64_t r1) {
    if (aq == ActQuant::Int16)
      detail::for_chunk<detail::I16Kernel>(mc, p, xq16.data() + m0 * K, xs.data() + m0 * G, r0, r1,
                                           y + m0 * N, N, acc);
    else if (aq == ActQuant::Int8)
      detail::for_chunk<detail::I8Kernel>(mc, p, xq.data() + m0 * K, xs.data() + m0 * G, r0, r1, y + m0 * N,
                                          N, acc);
    else
      detail::for_chunk<detail::F32Kernel>(mc, p, x + m0 * K, r0, r1, y + m0 * N, N, acc);
  });
}
#endif

}  // namespace cpu
}  // namespace qlora
