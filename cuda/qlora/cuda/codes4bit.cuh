#pragma once
// Device-side encoders and tables of the 4-bit and 8-bit bitsandbytes formats.
//
// The thresholds are copied into __constant__ memory from the one definition in
// qlora/quant/codebooks.hpp (namespace-scope constexpr arrays have no device storage of their own);
// the loops that read them are unrolled, so every read has a compile-time index and is served by
// the constant cache. `static`: each nvcc translation unit gets its own copy, as device code is
// compiled per translation unit here (no relocatable device code).
#include <cstdint>

#include "qlora/quant/codebooks.hpp"

namespace qlora {
namespace cuda {
namespace detail {

namespace cb = ::qlora::codebook;

static __constant__ float c_nf4_thresholds[15] = {
    cb::kNF4Thresholds[0],  cb::kNF4Thresholds[1],  cb::kNF4Thresholds[2],  cb::kNF4Thresholds[3],
    cb::kNF4Thresholds[4],  cb::kNF4Thresholds[5],  cb::kNF4Thresholds[6],  cb::kNF4Thresholds[7],
    cb::kNF4Thresholds[8],  cb::kNF4Thresholds[9],  cb::kNF4Thresholds[10], cb::kNF4Thresholds[11],
    cb::kNF4Thresholds[12], cb::kNF4Thresholds[13], cb::kNF4Thresholds[14]};
static __constant__ float c_fp4_thresholds[7] = {cb::kFP4Thresholds[0], cb::kFP4Thresholds[1],
                                                 cb::kFP4Thresholds[2], cb::kFP4Thresholds[3],
                                                 cb::kFP4Thresholds[4], cb::kFP4Thresholds[5],
                                                 cb::kFP4Thresholds[6]};

// kFP4RankToCode as 8 nibbles of one word, so the lookup is a shift (a divergent index into
// constant memory would serialize the warp).
constexpr std::uint32_t fp4_rank_nibbles() {
  std::uint32_t w = 0;
  for (int i = 0; i < 8; ++i) w |= std::uint32_t(cb::kFP4RankToCode[i]) << (4 * i);
  return w;
}
constexpr std::uint32_t kFP4RankNibbles = fp4_rank_nibbles();  // a scalar constexpr: usable on the device
static_assert(kFP4RankNibbles == 0x32547610u, "kFP4RankToCode changed: check the FP4 encoder");

// Same rules as quant::ref::encode_nf4 / encode_fp4: count of thresholds strictly below; NaN -> 0.
__device__ __forceinline__ std::uint32_t encode_nf4(float x) {
  std::uint32_t c = 0;
#pragma unroll
  for (int i = 0; i < 15; ++i) c += x > c_nf4_thresholds[i];
  return c;
}

__device__ __forceinline__ std::uint32_t encode_fp4(float x) {
  const std::uint32_t sign = x < 0.0f ? cb::kFP4SignBit : 0u;
  const float a = fabsf(x);
  std::uint32_t rank = 0;
#pragma unroll
  for (int i = 0; i < 7; ++i) rank += a > c_fp4_thresholds[i];
  return sign | ((kFP4RankNibbles >> (4 * rank)) & 0xfu);
}

template <bool NF4>
__device__ __forceinline__ std::uint32_t encode4(float x) {
  return NF4 ? encode_nf4(x) : encode_fp4(x);
}

// Tables passed to kernels by value (kernel parameters live in constant memory; kernels that index
// them with per-thread values copy them to shared memory first).
struct Code16Param {
  float v[16];
};
struct Code256Param {
  float v[256];
};

}  // namespace detail
}  // namespace cuda
}  // namespace qlora
