#pragma once
// NF4 and FP4 blockwise 4-bit quantization, optionally with double-quantized absmax, bitwise equal to
// bitsandbytes quantize_4bit / dequantize_4bit.
//
// Format
// - The tensor is flattened row-major and cut into blocks of `blocksize` values (32 .. 4096, a power
//   of two); the last block may be partial. absmax[b] = max |x| over the real values of block b.
// - Each value is scaled as x * (1.0f / absmax) (a multiply by the float32 reciprocal, not a
//   division: the two differ in the last bit) and encoded to a 4-bit code:
//     NF4: the number of kNF4Thresholds strictly below the scaled value (ties to the lower code);
//     FP4: sign bit (x < 0) | kFP4RankToCode[number of kFP4Thresholds strictly below |x|].
//   NaN encodes as code 0 under both rules, which is what an all-zero block gives (0 * inf).
// - Codes are packed two per byte, element 2j in the high nibble and 2j+1 in the low nibble; when
//   the element count is odd, the last low nibble is the code of a 0.0 padding value (scaled by the
//   last block's reciprocal, as bitsandbytes' kernel pads its loads with zeros).
// - Double quantization (bitsandbytes compress_statistics=True): offset = mean(absmax); the values
//   absmax - offset are quantized with the 8-bit blockwise scheme (dynamic map, blocksize 256):
//   codes `qabsmax` + `absmax2` per 256 blocks. Decoding: absmax = code[q] * absmax2[b / 256], then
//   + offset: two float32 roundings in that order (bitsandbytes runs them as separate kernels), so
//   this code never lets the compiler fuse them into an FMA.
// - Dequantization: out = code4[q] * absmax[b] in float32, then rounded to the output type; FP4
//   code 8 decodes to -0.0 (see decode_table).
#include <algorithm>
#include <array>
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
#include "qlora/quant/codebooks.hpp"

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace qlora {
namespace quant {

enum class Quant4Type : std::uint8_t { NF4, FP4 };

inline const char* quant4_name(Quant4Type t) { return t == Quant4Type::NF4 ? "nf4" : "fp4"; }

inline Quant4Type parse_quant4(const std::string& s) {
  if (s == "nf4") return Quant4Type::NF4;
  if (s == "fp4") return Quant4Type::FP4;
  throw_error("4-bit quant_type must be \"nf4\" or \"fp4\", got \"", s, "\"");
}

using Code16 = std::array<float, 16>;

inline const Code16& code4(Quant4Type t) {
  static const Code16 nf4 = [] {
    Code16 c{};
    for (int i = 0; i < 16; ++i) c[i] = bits_float(codebook::kNF4Bits[i]);
    return c;
  }();
  static const Code16 fp4 = [] {
    Code16 c{};
    for (int i = 0; i < 16; ++i) c[i] = bits_float(codebook::kFP4Bits[i]);
    return c;
  }();
  return t == Quant4Type::NF4 ? nf4 : fp4;
}

inline void check_blocksize4(int blocksize) {
  const bool pow2 = blocksize > 0 && (blocksize & (blocksize - 1)) == 0;
  QLORA_CHECK(pow2 && blocksize >= 32 && blocksize <= 4096,
              "4-bit blockwise: blocksize must be a power of two in [32, 4096], got ", blocksize);
}

// ------------------------------------------------------------------------------------------------
// Reference: plain loops, the oracle every fast path is tested against.
namespace ref {

inline std::uint8_t encode_nf4(float x) {
  std::uint8_t c = 0;
  for (float t : codebook::kNF4Thresholds) c = std::uint8_t(c + (x > t));
  return c;
}

inline std::uint8_t encode_fp4(float x) {
  const std::uint8_t sign = x < 0.0f ? codebook::kFP4SignBit : 0;
  const float a = std::fabs(x);
  int rank = 0;
  for (float t : codebook::kFP4Thresholds) rank += (a > t);
  return std::uint8_t(sign | codebook::kFP4RankToCode[rank]);
}

inline std::uint8_t encode4(Quant4Type t, float x) {
  return t == Quant4Type::NF4 ? encode_nf4(x) : encode_fp4(x);
}

// x: (n) -> packed: ((n + 1) / 2), absmax: (num_blocks(n, blocksize))
inline void quantize_4bit(const float* x, std::size_t n, Quant4Type type, int blocksize, std::uint8_t* packed,
                          float* absmax) {
  std::vector<std::uint8_t> codes(n + 1);
  float inv = 0.0f;
  for (std::size_t b = 0; b * blocksize < n; ++b) {
    const std::size_t lo = b * blocksize, hi = std::min(n, lo + blocksize);
    float amax = 0.0f;
    for (std::size_t i = lo; i < hi; ++i) amax = std::max(amax, std::fabs(x[i]));
    absmax[b] = amax;
    inv = 1.0f / amax;
    for (std::size_t i = lo; i < hi; ++i) codes[i] = encode4(type, x[i] * inv);
  }
  codes[n] = encode4(type, 0.0f * inv);  // padding value of an odd count
  for (std::size_t j = 0; j < (n + 1) / 2; ++j)
    packed[j] = std::uint8_t(codes[2 * j] << 4 | codes[2 * j + 1]);
}

// out: (n)
template <class T>
void dequantize_4bit(const std::uint8_t* packed, const float* absmax, std::size_t n, const Code16& code,
                     int blocksize, T* out) {
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint8_t byte = packed[i / 2];
    const std::uint8_t q = (i % 2 == 0) ? (byte >> 4) : (byte & 0xf);
    store(code[q] * absmax[i / blocksize], out + i);
  }
}

// offset = mean(absmax), rounded the way torch's CUDA float32 mean rounds it: 32 strided float
// accumulators (one per warp lane), a butterfly sum over the lanes (offsets 16, 8, 4, 2, 1), then a
// multiply by float(1 / n). This reproduces bitsandbytes' offsets on the golden data (<= 64 blocks);
// for larger tensors torch spreads the sum over more threads, so its offset may differ from this
// one by an ulp. Readers always take the offset stored in the file.
inline float mean_absmax(const float* absmax, std::size_t nblocks) {
  if (nblocks == 0) return 0.0f;
  float lane[32] = {};
  for (std::size_t i = 0; i < nblocks; ++i) lane[i % 32] += absmax[i];
  for (int off = 16; off >= 1; off /= 2)
    for (int i = 0; i < off; ++i) lane[i] += lane[i + off];
  return lane[0] * (1.0f / float(nblocks));
}

}  // namespace ref

// ------------------------------------------------------------------------------------------------
// A 4-bit tensor in bitsandbytes' layout: the packed codes plus its quant state.
struct Quantized4bit {
  Quant4Type type = Quant4Type::NF4;
  int blocksize = 64;
  std::vector<std::int64_t> shape;   // the original tensor's shape, e.g. (out, in)
  std::string dtype = "float32";     // the original tensor's torch dtype name (quant_state "dtype")
  std::vector<std::uint8_t> packed;  // ((numel + 1) / 2)
  Code16 code = code4(Quant4Type::NF4);

  // Exactly one of these describes absmax:
  std::vector<float> absmax;  // (blocks) when !double_quant
  bool double_quant = false;
  float offset = 0.0f;  // double_quant: mean of the absmax values
  Blockwise8 nested;    // double_quant: codes (blocks), absmax (ceil(blocks / 256)), map

  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
  std::size_t blocks() const { return num_blocks(std::size_t(numel()), blocksize); }
};

// Throws unless the sizes of every part agree with shape and blocksize (for data read from files).
inline void validate(const Quantized4bit& q, const std::string& what) {
  std::int64_t n = 1;
  for (auto d : q.shape) {
    QLORA_CHECK(d >= 0, what, ": negative dimension ", d, " in shape");
    QLORA_CHECK(d == 0 || n <= std::numeric_limits<std::int64_t>::max() / d, what, ": shape overflows");
    n *= d;
  }
  check_blocksize4(q.blocksize);
  const std::size_t blocks = q.blocks();
  QLORA_CHECK(q.packed.size() == std::size_t((n + 1) / 2), what, ": packed weight has ", q.packed.size(),
              " bytes, expected ", (n + 1) / 2, " for ", n, " values");
  if (q.double_quant) {
    QLORA_CHECK(q.nested.codes.size() == blocks, what, ": absmax has ", q.nested.codes.size(),
                " codes, expected ", blocks, " (one per block of ", q.blocksize, ")");
    QLORA_CHECK(q.nested.absmax.size() == num_blocks(blocks, q.nested.blocksize), what,
                ": nested_absmax has ", q.nested.absmax.size(), " values, expected ",
                num_blocks(blocks, q.nested.blocksize));
    QLORA_CHECK(std::isfinite(q.offset), what, ": nested_offset is ", q.offset);
  } else {
    QLORA_CHECK(q.absmax.size() == blocks, what, ": absmax has ", q.absmax.size(), " values, expected ",
                blocks, " (one per block of ", q.blocksize, ")");
  }
}

// The table dequantization multiplies by. bitsandbytes decodes FP4 as sign * (magnitude * absmax),
// so code 8 (sign bit, magnitude 0) gives -0.0, while the quant_map it stores holds +0.0 there.
inline Code16 decode_table(const Quantized4bit& q) {
  Code16 t = q.code;
  if (q.type == Quant4Type::FP4 && t[codebook::kFP4SignBit] == 0.0f) t[codebook::kFP4SignBit] = -0.0f;
  return t;
}

namespace detail {

#ifdef __AVX2__
// 8 scaled values -> 8 codes (int32 lanes), by a 4-step binary search over the thresholds; each
// step looks its threshold up with one in-register permute.
inline __m256i encode_nf4_x8(__m256 v) {
  const float* t = codebook::kNF4Thresholds;
  const __m256i k1 = _mm256_set1_epi32(1);
  __m256i idx = _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(v, _mm256_set1_ps(t[7]), _CMP_GT_OQ)),
                                 _mm256_set1_epi32(8));
  const __m256 t4 = _mm256_setr_ps(t[3], t[11], 0, 0, 0, 0, 0, 0);                      // step 4: t[idx + 3]
  const __m256 t2 = _mm256_setr_ps(t[1], t[5], t[9], t[13], 0, 0, 0, 0);                // step 2: t[idx + 1]
  const __m256 t1 = _mm256_setr_ps(t[0], t[2], t[4], t[6], t[8], t[10], t[12], t[14]);  // step 1: t[idx]
  __m256 m = _mm256_cmp_ps(v, _mm256_permutevar8x32_ps(t4, _mm256_srli_epi32(idx, 3)), _CMP_GT_OQ);
  idx = _mm256_add_epi32(idx, _mm256_and_si256(_mm256_castps_si256(m), _mm256_set1_epi32(4)));
  m = _mm256_cmp_ps(v, _mm256_permutevar8x32_ps(t2, _mm256_srli_epi32(idx, 2)), _CMP_GT_OQ);
  idx = _mm256_add_epi32(idx, _mm256_and_si256(_mm256_castps_si256(m), _mm256_set1_epi32(2)));
  m = _mm256_cmp_ps(v, _mm256_permutevar8x32_ps(t1, _mm256_srli_epi32(idx, 1)), _CMP_GT_OQ);
  return _mm256_add_epi32(idx, _mm256_and_si256(_mm256_castps_si256(m), k1));
}

inline __m256i encode_fp4_x8(__m256 v) {
  const float* t = codebook::kFP4Thresholds;
  const __m256i sign =
      _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ)),
                       _mm256_set1_epi32(codebook::kFP4SignBit));
  const __m256 a = _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)));
  __m256i r = _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(a, _mm256_set1_ps(t[3]), _CMP_GT_OQ)),
                               _mm256_set1_epi32(4));
  const __m256 t2 = _mm256_setr_ps(t[1], t[5], 0, 0, 0, 0, 0, 0);        // step 2: t[r + 1]
  const __m256 t1 = _mm256_setr_ps(t[0], t[2], t[4], t[6], 0, 0, 0, 0);  // step 1: t[r]
  __m256 m = _mm256_cmp_ps(a, _mm256_permutevar8x32_ps(t2, _mm256_srli_epi32(r, 2)), _CMP_GT_OQ);
  r = _mm256_add_epi32(r, _mm256_and_si256(_mm256_castps_si256(m), _mm256_set1_epi32(2)));
  m = _mm256_cmp_ps(a, _mm256_permutevar8x32_ps(t1, _mm256_srli_epi32(r, 1)), _CMP_GT_OQ);
  r = _mm256_add_epi32(r, _mm256_and_si256(_mm256_castps_si256(m), _mm256_set1_epi32(1)));
  const auto& map = codebook::kFP4RankToCode;
  const __m256i code = _mm256_setr_epi32(map[0], map[1], map[2], map[3], map[4], map[5], map[6], map[7]);
  return _mm256_or_si256(_mm256_permutevar8x32_epi32(code, r), sign);
}

// 16 codes (two vectors of 8 int32) -> 8 packed bytes, element 2j in the high nibble.
inline void pack16(__m256i a, __m256i b, std::uint8_t* out) {
  const __m256i shift = _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0);
  __m256i h = _mm256_hadd_epi32(_mm256_sllv_epi32(a, shift), _mm256_sllv_epi32(b, shift));
  h = _mm256_permutevar8x32_epi32(h, _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7));  // bytes 0..7 in order
  const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packus_epi16(w, w));
}
#endif

// One block (or the partial last one): x (len) -> packed (len / 2 bytes, + the odd tail).
template <Quant4Type T>
inline void quantize4_block(const float* x, std::size_t len, float inv, std::uint8_t* packed) {
  std::size_t i = 0;
#ifdef __AVX2__
  const __m256 vinv = _mm256_set1_ps(inv);
  for (; i + 16 <= len; i += 16) {
    const __m256 v0 = _mm256_mul_ps(_mm256_loadu_ps(x + i), vinv);
    const __m256 v1 = _mm256_mul_ps(_mm256_loadu_ps(x + i + 8), vinv);
    if (T == Quant4Type::NF4)
      pack16(encode_nf4_x8(v0), encode_nf4_x8(v1), packed + i / 2);
    else
      pack16(encode_fp4_x8(v0), encode_fp4_x8(v1), packed + i / 2);
  }
#endif
  for (; i + 2 <= len; i += 2)
    packed[i / 2] = std::uint8_t(ref::encode4(T, x[i] * inv) << 4 | ref::encode4(T, x[i + 1] * inv));
  if (i < len) {  // odd count: only possible in the last block
    packed[i / 2] = std::uint8_t(ref::encode4(T, x[i] * inv) << 4 | ref::encode4(T, 0.0f * inv));
  }
}

template <class Out>
inline void dequantize4_block(const std::uint8_t* packed, std::size_t len, const Code16& code, float amax,
                              Out* out) {
  std::size_t i = 0;
#ifdef __AVX2__
  const __m256 lo_tab = _mm256_loadu_ps(code.data()), hi_tab = _mm256_loadu_ps(code.data() + 8);
  const __m256 vmax = _mm256_set1_ps(amax);
  const __m128i nib = _mm_set1_epi8(0x0f);
  for (; i + 16 <= len; i += 16) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + i / 2));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nib), lo = _mm_and_si128(bytes, nib);
    const __m128i q = _mm_unpacklo_epi8(hi, lo);  // 16 codes in element order
    for (int half = 0; half < 2; ++half) {
      const __m256i idx = _mm256_cvtepu8_epi32(half ? _mm_srli_si128(q, 8) : q);
      // code[idx]: permute both 8-entry halves of the table, pick by bit 3 of idx
      const __m256 pick = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
      const __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo_tab, idx),
                                        _mm256_permutevar8x32_ps(hi_tab, idx), pick);
      store8(out + i + 8 * half, _mm256_mul_ps(v, vmax));
    }
  }
#endif
  for (; i < len; ++i) {
    const std::uint8_t byte = packed[i / 2];
    store(code[(i % 2 == 0) ? (byte >> 4) : (byte & 0xf)] * amax, out + i);
  }
}

// Decode double-quantized absmax values [b0, b1) into out.
inline void decode_nested(const Quantized4bit& q, std::size_t b0, std::size_t b1, float* out) {
  for (std::size_t b = b0; b < b1; ++b) {
    // volatile: the product must be rounded to float32 before the add, never fused into an FMA
    volatile float scaled = q.nested.code[q.nested.codes[b]] * q.nested.absmax[b / q.nested.blocksize];
    out[b - b0] = scaled + q.offset;
  }
}

}  // namespace detail

// The per-block absmax values as float32 (decoding the double quantization when there is one).
inline std::vector<float> decode_absmax(const Quantized4bit& q) {
  if (!q.double_quant) return q.absmax;
  std::vector<float> out(q.blocks());
  detail::decode_nested(q, 0, out.size(), out.data());
  return out;
}

struct Quant4Config {
  Quant4Type type = Quant4Type::NF4;
  int blocksize = 64;
  bool double_quant = true;
};

// Fast quantizer: x (shape) in row-major order. Byte-identical to ref::quantize_4bit (+ double
// quantization). Throws qlora::Error on a NaN / inf input, naming `what` and the index.
inline Quantized4bit quantize_4bit(const float* x, std::vector<std::int64_t> shape, const Quant4Config& cfg,
                                   const std::string& what = "tensor") {
  check_blocksize4(cfg.blocksize);
  Quantized4bit q;
  q.type = cfg.type;
  q.blocksize = cfg.blocksize;
  q.shape = std::move(shape);
  q.code = code4(cfg.type);
  const std::size_t n = std::size_t(q.numel());
  q.packed.resize((n + 1) / 2);
  std::vector<float> absmax(q.blocks());
  const std::size_t bs = std::size_t(cfg.blocksize);
  std::atomic<bool> bad{false};
  parallel_for(n, bs, 1 << 15, [&](std::size_t e0, std::size_t e1) {
    for (std::size_t lo = e0; lo < e1; lo += bs) {
      const std::size_t len = std::min(bs, n - lo);
      // the finiteness check reads the block while it is in cache for the absmax pass
      if (!all_finite(x + lo, len)) bad.store(true, std::memory_order_relaxed);
      const float amax = detail::block_absmax(x + lo, len);
      absmax[lo / bs] = amax;
      if (cfg.type == Quant4Type::NF4)
        detail::quantize4_block<Quant4Type::NF4>(x + lo, len, 1.0f / amax, q.packed.data() + lo / 2);
      else
        detail::quantize4_block<Quant4Type::FP4>(x + lo, len, 1.0f / amax, q.packed.data() + lo / 2);
    }
  });
  if (bad.load()) throw_not_finite(x, n, what);
  if (!cfg.double_quant) {
    q.absmax = std::move(absmax);
    return q;
  }
  q.double_quant = true;
  q.offset = ref::mean_absmax(absmax.data(), absmax.size());
  for (float& a : absmax) a -= q.offset;
  q.nested = quantize_blockwise8(absmax.data(), absmax.size(), codebook::kNestedBlocksize);
  return q;
}

// out: (numel) as float, bf16 or fp16.
template <class Out>
void dequantize(const Quantized4bit& q, Out* out) {
  validate(q, "4-bit tensor");
  const std::size_t n = std::size_t(q.numel()), bs = std::size_t(q.blocksize);
  const Code16 table = decode_table(q);
  parallel_for(n, bs, 1 << 15, [&](std::size_t e0, std::size_t e1) {
    std::vector<float> amax((e1 - e0 + bs - 1) / bs);
    if (q.double_quant)
      detail::decode_nested(q, e0 / bs, e0 / bs + amax.size(), amax.data());
    else
      std::copy(q.absmax.begin() + e0 / bs, q.absmax.begin() + e0 / bs + amax.size(), amax.begin());
    for (std::size_t lo = e0; lo < e1; lo += bs)
      detail::dequantize4_block(q.packed.data() + lo / 2, std::min(bs, n - lo), table, amax[(lo - e0) / bs],
                                out + lo);
  });
}

}  // namespace quant
}  // namespace qlora
