#pragma once
// Refusing NaN / inf before quantizing: one NaN would silently turn its whole block (or row) into
// garbage, so every quantizer that takes user data checks. all_finite() is meant to run on a block
// the quantizer is about to read anyway (so the check costs no extra trip to memory); check_finite()
// is the stand-alone pass, and the place that builds the error message.
#include <atomic>
#include <cmath>
#include <cstddef>
#include <limits>
#include <string>

#include "qlora/core/error.hpp"
#include "qlora/core/parallel.hpp"

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace qlora {

inline bool all_finite(const float* x, std::size_t n) {
  std::size_t i = 0;
#ifdef __AVX2__
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 big = _mm256_set1_ps(std::numeric_limits<float>::max());
  __m256 bad = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8)  // |x| > max, or unordered (NaN)
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask), big, _CMP_NLE_UQ));
  if (_mm256_movemask_ps(bad)) return false;
#endif
  bool ok = true;
  for (; i < n; ++i) ok &= std::fabs(x[i]) <= std::numeric_limits<float>::max();
  return ok;
}

// Throws naming `what` and the index of the first NaN / inf value.
[[noreturn]] inline void throw_not_finite(const float* x, std::size_t n, const std::string& what) {
  for (std::size_t i = 0; i < n; ++i)
    QLORA_CHECK(std::isfinite(x[i]), what, ": value ", i, " is ", x[i], ", expected a finite number");
  throw_error(what, ": a value is not finite");  // unreachable when called after all_finite() failed
}

inline void check_finite(const float* x, std::size_t n, const std::string& what) {
  std::atomic<bool> bad{false};
  parallel_for(n, 4096, 1 << 18, [&](std::size_t b0, std::size_t b1) {
    if (!all_finite(x + b0, b1 - b0)) bad.store(true, std::memory_order_relaxed);
  });
  if (bad.load()) throw_not_finite(x, n, what);
}

}  // namespace qlora
