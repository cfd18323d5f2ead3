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
#include <cmath>
#include <cstddef>
#include <cstdint>
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

namespace ref {

// x: (rows, cols) -> q: (rows, cols), scb: (rows)
inline void quantize_rowwise_int8(const float* x, std::int64_t rows, std::int64_t cols, std::int8_t* q,
                                  float* scb) {
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * cols;
    float amax = 0.0f;
    for (std::int64_t c = 0; c < cols; ++c) amax = std::max(amax, std::fabs(row[c]));
    scb[r] = amax;
    const float s = amax > 0.0f ? 127.0f / amax : 0.0f;
    for (std::int64_t c = 0; c < cols; ++c) {
      // nearbyint under the default rounding mode is round-half-to-even
      const float v = std::nearbyint(row[c] * s);
      q[r * cols + c] = std::int8_t(std::max(-127.0f, std::min(127.0f, v)));
    }
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

// Fast path: rows over threads, AVX2 within a row. Equal to ref::quantize_rowwise_int8.
// Throws on NaN / inf, naming `what`.
inline RowwiseInt8 quantize_rowwise_int8(const float* x, std::int64_t rows, std::int64_t cols,
                                         const std::string& what = "tensor") {
  QLORA_CHECK(rows >= 0 && cols >= 0, what, ": row-wise int8 needs a non-negative shape, got (", rows, ", ",
              cols, ")");
  check_finite(x, std::size_t(rows * cols), what);
  RowwiseInt8 out;
  out.rows = rows;
  out.cols = cols;
  out.q.resize(std::size_t(rows * cols));
  out.scb.resize(std::size_t(rows));
  parallel_for(std::size_t(rows), 1, std::max<std::size_t>(1, 65536 / std::max<std::int64_t>(cols, 1)),
               [&](std::size_t r0, std::size_t r1) {
                 for (std::size_t r = r0; r < r1; ++r) {
                   const float* row = x + r * cols;
                   std::int8_t* qr = out.q.data() + r * cols;
                   const float amax = detail::block_absmax(row, std::size_t(cols));
                   out.scb[r] = amax;
                   const float s = amax > 0.0f ? 127.0f / amax : 0.0f;
                   std::int64_t c = 0;
#ifdef __AVX2__
                   const __m256 vs = _mm256_set1_ps(s);
                   for (; c + 16 <= cols; c += 16) {
                     // cvtps rounds with the current mode (nearest even); packs saturate to [-128, 127]
                     // and |x * s| <= 127 up to an ulp, which rounds back to 127.
                     const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(row + c), vs));
                     const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(row + c + 8), vs));
                     __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
                     __m128i z = _mm_packs_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
                     __m128i bytes = _mm_packs_epi16(w, z);
                     bytes = _mm_max_epi8(bytes, _mm_set1_epi8(-127));
                     _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + c), bytes);
                   }
#endif
                   for (; c < cols; ++c)
                     qr[c] = std::int8_t(std::max(-127.0f, std::min(127.0f, std::nearbyint(row[c] * s))));
                 }
               });
  return out;
}

template <class T>
void dequantize(const RowwiseInt8& t, T* out) {
  QLORA_CHECK(t.q.size() == std::size_t(t.rows * t.cols) && t.scb.size() == std::size_t(t.rows),
              "row-wise int8: ", t.q.size(), " codes and ", t.scb.size(), " scales for shape (", t.rows, ", ",
              t.cols, ")");
  parallel_for(std::size_t(t.rows), 1, 1, [&](std::size_t r0, std::size_t r1) {
    ref::dequantize_rowwise_int8(t.q.data() + r0 * t.cols, t.scb.data() + r0, std::int64_t(r1 - r0), t.cols,
                                 out + r0 * t.cols);
  });
}

}  // namespace quant
}  // namespace qlora
