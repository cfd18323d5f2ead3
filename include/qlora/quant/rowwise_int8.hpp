#pragma once
// Row-wise int8 absmax quantization (LLM.int8() weights, bitsandbytes Int8Params / `SCB`).
//
// Format: for a (rows, cols) matrix, SCB[r] = max |W[r, :]| (float32) and
//   q[r, c] = round_half_even(W[r, c] * (127.0f / SCB[r]))      (int8, in [-127, 127])
// Decoding follows bitsandbytes' int8_vectorwise_dequant: (q * SCB[r]) * (1/127 as float32), two
// float32 roundings. A row of zeros has SCB 0 and codes 0 (bitsandbytes would compute 0 * inf).
// Note: bitsandbytes' CUDA kernel computes 127/SCB with the fast approximate division
// (__fdividef); this uses the correctly rounded quotient, which its torch/CPU path also uses.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/core/finite.hpp"
#include "qlora/core/half.hpp"
#include "qlora/core/parallel.hpp"
#include "qlora/quant/blockwise8bit.hpp"

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace qlora {
namespace quant {

constexpr float kInv127 = 7.874015718698502e-3f;  // float32(1 / 127), as bitsandbytes writes it

struct RowwiseInt8 {
  std::int64_t rows = 0, cols = 0;
  std::vector<std::int8_t> q;  // (rows, cols)
  std::vector<float> scb;      // (rows)
};

// The row scale 127 / SCB, 0 for a zero row. Below SCB ~ 3.7e-37 the quotient overflows to inf;
// such rows (never seen in real weights) are encoded through double precision instead, by both
// paths, so they still get the nearest codes in [-127, 127].
inline float row_scale(float amax) { return amax > 0.0f ? 127.0f / amax : 0.0f; }

inline std::int8_t encode_int8(float x, float s, float amax) {
  // nearbyint under the default rounding mode is round-half-to-even
  const float v = s <= std::numeric_limits<float>::max()
                      ? std::nearbyint(x * s)
                      : float(std::nearbyint(double(x) * 127.0 / double(amax)));
  return std::int8_t(std::max(-127.0f, std::min(127.0f, v)));
}

namespace ref {

// x: (rows, cols) -> q: (rows, cols), scb: (rows)
inline void quantize_rowwise_int8(const float* x, std::int64_t rows, std::int64_t cols, std::int8_t* q,
                                  float* scb) {
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * cols;
    float amax = 0.0f;
    for (std::int64_t c = 0; c < cols; ++c) amax = std::max(amax, std::fabs(row[c]));
    scb[r] = amax;
    const float s = row_scale(amax);
    for (std::int64_t c = 0; c < cols; ++c) q[r * cols + c] = encode_int8(row[c], s, amax);
  }
}

template <class T>
void dequantize_rowwise_int8(const std::int8_t* q, const float* scb, std::int64_t rows, std::int64_t cols,
                             T* out) {
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; ++c) {
      const float prod = float(q[r * cols + c]) * scb[r];
      store(prod * kInv127, out + r * cols + c);
    }
}

}  // namespace ref

// Fast path: rows over threads, AVX2 within a row. Equal to ref::quantize_rowwise_int8. Throws on
// NaN / inf, naming `what`.
inline RowwiseInt8 quantize_rowwise_int8(const float* x, std::int64_t rows, std::int64_t cols,
                                         const std::string& what = "tensor") {
  QLORA_CHECK(rows >= 0 && cols >= 0, what, ": row-wise int8 needs a non-negative shape, got (", rows, ", ",
              cols, ")");
  RowwiseInt8 out;
  out.rows = rows;
  out.cols = cols;
  out.q.resize(std::size_t(rows * cols));
  out.scb.resize(std::size_t(rows));
  std::atomic<bool> bad{false};
  const std::size_t rows_per_thread =
      std::max<std::size_t>(1, 65536 / std::size_t(std::max<std::int64_t>(cols, 1)));
  parallel_for(std::size_t(rows), 1, rows_per_thread, [&](std::size_t r0, std::size_t r1) {
    for (std::size_t r = r0; r < r1; ++r) {
      const float* row = x + r * cols;
      std::int8_t* qr = out.q.data() + r * cols;
      if (!all_finite(row, std::size_t(cols))) bad.store(true, std::memory_order_relaxed);
      const float amax = detail::block_absmax(row, std::size_t(cols));
      out.scb[r] = amax;
      const float s = row_scale(amax);
      std::int64_t c = 0;
#ifdef __AVX2__
      if (s <= std::numeric_limits<float>::max()) {
        const __m256 vs = _mm256_set1_ps(s);
        for (; c + 16 <= cols; c += 16) {
          // cvtps rounds with the current mode (nearest even); packs saturate, and |x * s| <= 127
          // up to an ulp, which rounds back to 127; the max() keeps -128 out.
          const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(row + c), vs));
          const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(row + c + 8), vs));
          const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
          const __m128i z = _mm_packs_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
          const __m128i bytes = _mm_max_epi8(_mm_packs_epi16(w, z), _mm_set1_epi8(-127));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + c), bytes);
        }
      }
#endif
      for (; c < cols; ++c) qr[c] = encode_int8(row[c], s, amax);
    }
  });
  if (bad.load()) throw_not_finite(x, std::size_t(rows * cols), what);
  return out;
}

// out: (rows, cols) as float, bf16 or fp16: (q * SCB) * float(1/127), as bitsandbytes computes it.
template <class T>
void dequantize(const RowwiseInt8& t, T* out) {
  QLORA_CHECK(t.q.size() == std::size_t(t.rows * t.cols) && t.scb.size() == std::size_t(t.rows),
              "row-wise int8: ", t.q.size(), " codes and ", t.scb.size(), " scales for shape (", t.rows, ", ",
              t.cols, ")");
  const std::size_t cols = std::size_t(t.cols);
  const std::size_t rows_per_thread = std::max<std::size_t>(1, 65536 / std::max<std::size_t>(cols, 1));
  parallel_for(std::size_t(t.rows), 1, rows_per_thread, [&](std::size_t r0, std::size_t r1) {
    for (std::size_t r = r0; r < r1; ++r) {
      const std::int8_t* q = t.q.data() + r * cols;
      T* o = out + r * cols;
      std::size_t c = 0;
#ifdef __AVX2__
      const __m256 scb = _mm256_set1_ps(t.scb[r]), inv = _mm256_set1_ps(kInv127);
      for (; c + 8 <= cols; c += 8) {
        const __m256 v = _mm256_cvtepi32_ps(
            _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + c))));
        store8(o + c, _mm256_mul_ps(_mm256_mul_ps(v, scb), inv));  // two roundings, in that order
      }
#endif
      for (; c < cols; ++c) store((float(q[c]) * t.scb[r]) * kInv127, o + c);
    }
  });
}

}  // namespace quant
}  // namespace qlora
