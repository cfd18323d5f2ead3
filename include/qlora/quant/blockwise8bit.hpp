#pragma once
// 8-bit blockwise quantization with bitsandbytes' signed dynamic map.
//
// Format (bitsandbytes quantize_blockwise): the tensor is flattened row-major and cut into blocks of
// `blocksize` values (the last block may be partial). Per block, absmax = max |x| (float32); each
// value is scaled as x * (1.0f / absmax) and encoded as the index of the nearest of the 256 map
// values. Decoding is code[q] * absmax (one float32 rounding).
//
// "Nearest" is bitsandbytes' rule exactly: its kernel binary-searches the map with steps 64..1 from
// index 127, which always ends on an even index p, and then compares against the float32 midpoint
// (a + b) * 0.5f of p and its neighbour. So: nearest by those midpoints, a value exactly on a
// midpoint goes to the even index, and NaN (absmax 0 gives 0 * inf) goes to index 0.
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/core/finite.hpp"
#include "qlora/core/half.hpp"
#include "qlora/core/parallel.hpp"
#include "qlora/quant/codebooks.hpp"

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace qlora {
namespace quant {

using Code256 = std::array<float, 256>;

inline const Code256& dynamic_map_signed() {
  static const Code256 table = [] {
    Code256 t{};
    for (int i = 0; i < 256; ++i) t[i] = bits_float(codebook::kDynamicMapSignedBits[i]);
    return t;
  }();
  return table;
}

// The 255 decision midpoints of an ascending 256-value map, plus +inf at [255] so a search never
// reads past the end.
inline std::array<float, 256> midpoints(const Code256& code) {
  std::array<float, 256> mid{};
  for (int i = 0; i < 255; ++i) mid[i] = (code[i] + code[i + 1]) * 0.5f;
  mid[255] = INFINITY;
  return mid;
}

inline void check_blocksize8(int blocksize) {
  const bool pow2 = blocksize > 0 && (blocksize & (blocksize - 1)) == 0;
  QLORA_CHECK(pow2 && blocksize >= 64 && blocksize <= 4096,
              "8-bit blockwise: blocksize must be a power of two in [64, 4096], got ", blocksize);
}

inline std::size_t num_blocks(std::size_t n, int blocksize) {
  return (n + std::size_t(blocksize) - 1) / std::size_t(blocksize);
}

// ------------------------------------------------------------------------------------------------
// Reference: plain loops, the oracle for the fast path.
namespace ref {

// Nearest map index for one scaled value, with bitsandbytes' tie and NaN rules (see top).
inline std::uint8_t encode_dynamic(const Code256& code, float x) {
  int idx = 0;  // number of midpoints strictly below x
  for (int i = 0; i < 255; ++i)
    if (x > (code[i] + code[i + 1]) * 0.5f) idx = i + 1;
  if (idx < 255 && (idx & 1) && x == (code[idx] + code[idx + 1]) * 0.5f) ++idx;  // tie -> even index
  return std::uint8_t(idx);
}

// x: (n), q: (n), absmax: (num_blocks)
inline void quantize_blockwise8(const float* x, std::size_t n, int blocksize, const Code256& code,
                                std::uint8_t* q, float* absmax) {
  for (std::size_t b = 0; b * blocksize < n; ++b) {
    const std::size_t lo = b * blocksize, hi = std::min(n, lo + blocksize);
    float amax = 0.0f;
    for (std::size_t i = lo; i < hi; ++i) amax = std::max(amax, std::fabs(x[i]));
    absmax[b] = amax;
    const float inv = 1.0f / amax;
    for (std::size_t i = lo; i < hi; ++i) q[i] = encode_dynamic(code, x[i] * inv);
  }
}

template <class T>
void dequantize_blockwise8(const std::uint8_t* q, const float* absmax, std::size_t n, int blocksize,
                           const Code256& code, T* out) {
  for (std::size_t i = 0; i < n; ++i) store(code[q[i]] * absmax[i / blocksize], out + i);
}

}  // namespace ref

// ------------------------------------------------------------------------------------------------
// Fast path: blocks spread over threads; AVX2 binary search over the midpoints with gathers.
namespace detail {

inline float block_absmax(const float* x, std::size_t n) {
  std::size_t i = 0;
  float amax = 0.0f;
#ifdef __AVX2__
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 m = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
  amax = _mm_cvtss_f32(h);
#endif
  for (; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  return amax;
}

inline void encode_dynamic_block(const float* x, std::size_t n, float inv, const Code256& code,
                                 const std::array<float, 256>& mid, std::uint8_t* q) {
  std::size_t i = 0;
#ifdef __AVX2__
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256i one = _mm256_set1_epi32(1);
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i), vinv);
    __m256i idx = _mm256_setzero_si256();  // count of midpoints < v, found by binary search
    for (int step = 128; step >= 1; step >>= 1) {
      const __m256i probe = _mm256_add_epi32(idx, _mm256_set1_epi32(step - 1));
      const __m256 m = _mm256_i32gather_ps(mid.data(), probe, 4);
      const __m256i gt = _mm256_castps_si256(_mm256_cmp_ps(v, m, _CMP_GT_OQ));
      idx = _mm256_add_epi32(idx, _mm256_and_si256(gt, _mm256_set1_epi32(step)));
    }
    // exactly on a midpoint with an odd lower index: the even (upper) index wins
    const __m256 at = _mm256_i32gather_ps(mid.data(), idx, 4);
    const __m256i tie =
        _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(v, at, _CMP_EQ_OQ)), _mm256_and_si256(idx, one));
    idx = _mm256_add_epi32(idx, _mm256_and_si256(tie, one));
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(idx), _mm256_extracti128_si256(idx, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm_packus_epi16(w, w));
  }
#else
  (void)mid;
#endif
  for (; i < n; ++i) q[i] = ref::encode_dynamic(code, x[i] * inv);
}

}  // namespace detail

// A blockwise 8-bit tensor: codes, per-block absmax, and the map they index.
struct Blockwise8 {
  int blocksize = 256;
  std::vector<std::uint8_t> codes;  // (n)
  std::vector<float> absmax;        // (num_blocks(n, blocksize))
  Code256 code = dynamic_map_signed();

  std::size_t numel() const { return codes.size(); }
};

// Fast quantizer, byte-identical to ref::quantize_blockwise8. Throws on NaN / inf, naming `what`.
inline Blockwise8 quantize_blockwise8(const float* x, std::size_t n, int blocksize,
                                      const Code256& code = dynamic_map_signed(),
                                      const std::string& what = "tensor") {
  check_blocksize8(blocksize);
  Blockwise8 out;
  out.blocksize = blocksize;
  out.code = code;
  out.codes.resize(n);
  out.absmax.resize(num_blocks(n, blocksize));
  const auto mid = midpoints(code);
  std::atomic<bool> bad{false};
  parallel_for(n, std::size_t(blocksize), 1 << 16, [&](std::size_t b0, std::size_t b1) {
    for (std::size_t lo = b0; lo < b1; lo += blocksize) {
      const std::size_t len = std::min<std::size_t>(blocksize, n - lo);
      if (!all_finite(x + lo, len)) bad.store(true, std::memory_order_relaxed);
      const float amax = detail::block_absmax(x + lo, len);
      out.absmax[lo / blocksize] = amax;
      detail::encode_dynamic_block(x + lo, len, 1.0f / amax, code, mid, out.codes.data() + lo);
    }
  });
  if (bad.load()) throw_not_finite(x, n, what);
  return out;
}

// out: (numel) in float, bf16 or fp16.
template <class T>
void dequantize(const Blockwise8& t, T* out) {
  const std::size_t n = t.numel(), bs = std::size_t(t.blocksize);
  QLORA_CHECK(t.absmax.size() == num_blocks(n, t.blocksize), "8-bit blockwise: ", t.absmax.size(),
              " absmax values for ", n, " values in blocks of ", t.blocksize, ", expected ",
              num_blocks(n, t.blocksize));
  parallel_for(n, bs, 1 << 16, [&](std::size_t b0, std::size_t b1) {
    for (std::size_t lo = b0; lo < b1; lo += bs) {
      const std::size_t len = std::min(bs, n - lo);
      const float amax = t.absmax[lo / bs];
      const std::uint8_t* q = t.codes.data() + lo;
      std::size_t i = 0;
#ifdef __AVX2__
      const __m256 vmax = _mm256_set1_ps(amax);
      for (; i + 8 <= len; i += 8) {
        const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i)));
        store8(out + lo + i, _mm256_mul_ps(_mm256_i32gather_ps(t.code.data(), idx, 4), vmax));
      }
#endif
      for (; i < len; ++i) store(t.code[q[i]] * amax, out + lo + i);
    }
  });
}

}  // namespace quant
}  // namespace qlora
