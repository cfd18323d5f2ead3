#pragma once
// Pieces shared by the fused small-M products (gemv_4bit.hpp, gemv_int8.hpp, gemv_bf16.hpp): the
// horizontal sum, the Accumulate store, and the dispatch of a chunk of activation rows to a kernel
// compiled for that count (so its accumulators live in registers).
#include <algorithm>
#include <cstdint>

#include "qlora/backend/cpu/accumulate.hpp"
#include "qlora/backend/cpu/thread_pool.hpp"
#include "qlora/core/parallel.hpp"

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace qlora {
namespace cpu {
#ifdef __AVX2__
namespace detail {

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

inline void store_out(float* y, float v, Accumulate acc) { *y = acc == Accumulate::Yes ? *y + v : v; }

constexpr int kMaxChunk = 4;  // activation rows per pass over the weight

// Dispatch a chunk of mc (1..kMaxChunk) activation rows to the kernel compiled for it.
template <template <int> class Kernel, class... Args>
void for_chunk(int mc, Args&&... args) {
  switch (mc) {
    case 1: Kernel<1>::run(args...); break;
    case 2: Kernel<2>::run(args...); break;
    case 3: Kernel<3>::run(args...); break;
    default: Kernel<4>::run(args...); break;
  }
}

// Rows of W over threads (at least min_rows each, so a thread start pays for itself), a few rows at
// a time, all activation chunks for each: a row's weights are read from memory once and reused
// from L1 for the next chunks. f(m0, mc, r0, r1) runs the kernel for activation rows [m0, m0 + mc)
// and weight rows [r0, r1).
template <class F>
void gemv_rows(std::int64_t N, std::int64_t M, std::int64_t min_rows, const F& f) {
  constexpr std::int64_t kRowBlock = 8;
  pool_for(std::size_t(N), 8, std::size_t(min_rows), [&](std::size_t b, std::size_t e) {
    for (std::int64_t r0 = std::int64_t(b); r0 < std::int64_t(e); r0 += kRowBlock) {
      const std::int64_t r1 = std::min(r0 + kRowBlock, std::int64_t(e));
      for (std::int64_t m0 = 0; m0 < M; m0 += kMaxChunk)
        f(m0, int(std::min<std::int64_t>(kMaxChunk, M - m0)), r0, r1);
    }
  });
}

}  // namespace detail
#endif
}  // namespace cpu
}  // namespace qlora
