#pragma once
// 4-bit NF4 / FP4 -> bf16 / fp16 / float on the GPU, bit for bit what quant::dequantize computes on the
// CPU: out = code[q] * absmax in float32, rounded once to the output type; with double quantization
// absmax = (map[qabsmax] * absmax2) + offset, two float32 roundings (no FMA).
//
// Memory-bound: a thread turns 4 packed bytes (8 values, all in one block since blocks hold at least
// 32 values) into one 16-byte store; the 16-entry code table (and the 256-entry nested map) sit in
// shared memory, where the 16 code values occupy 16 distinct banks, so the lookups never conflict.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "qlora/cuda/codes4bit.cuh"
#include "qlora/cuda/context.cuh"
#include "qlora/cuda/quantized4bit.cuh"

namespace qlora {
namespace cuda {
namespace detail {

// The absmax of block b: stored, or decoded from the double quantization (two roundings, as the CPU).
struct AbsmaxView {
  const float* absmax;          // (blocks) or nullptr when double-quantized
  const std::uint8_t* qabsmax;  // (blocks)
  const float* absmax2;         // (blocks / nested_blocksize)
  float offset;
  int nested_shift;  // log2(nested_blocksize)
};

// A double-quantized absmax from its code's value (map[code]), its nested absmax and the offset:
// the CPU's two float32 roundings. Every kernel that decodes absmax codes goes through this.
__device__ __forceinline__ float nested_absmax(float code_value, float absmax2, float offset) {
  return __fadd_rn(__fmul_rn(code_value, absmax2), offset);
}

__device__ __forceinline__ float block_absmax(const AbsmaxView& a, const float* s_map, std::size_t b) {
  if (a.absmax) return __ldg(a.absmax + b);
  return nested_absmax(s_map[__ldg(a.qabsmax + b)], __ldg(a.absmax2 + (b >> a.nested_shift)), a.offset);
}

__device__ __forceinline__ void store1(__nv_bfloat16* out, float v) { *out = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store1(__half* out, float v) { *out = __float2half_rn(v); }
__device__ __forceinline__ void store1(float* out, float v) { *out = v; }

// A grid-stride loop over groups of 8 values (4 packed bytes in, one 16-byte bf16 store out, so a
// warp's loads and stores are both contiguous), 4 groups per thread per step with their loads issued
// first; blockDim 256. The tables reach shared memory through reads with a warp-uniform index (a
// divergent index into the kernel parameters would serialize).
template <class Out>
__device__ __forceinline__ void store8(Out* out, const float v[8]);
template <>
__device__ __forceinline__ void store8(__nv_bfloat16* out, const float v[8]) {
  uint4 w;
  std::uint32_t* u = reinterpret_cast<std::uint32_t*>(&w);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * j], v[2 * j + 1]);
    u[j] = *reinterpret_cast<const std::uint32_t*>(&h);
  }
  *reinterpret_cast<uint4*>(out) = w;
}
template <>
__device__ __forceinline__ void store8(__half* out, const float v[8]) {
  uint4 w;
  std::uint32_t* u = reinterpret_cast<std::uint32_t*>(&w);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const __half2 h = __floats2half2_rn(v[2 * j], v[2 * j + 1]);
    u[j] = *reinterpret_cast<const std::uint32_t*>(&h);
  }
  *reinterpret_cast<uint4*>(out) = w;
}
template <>
__device__ __forceinline__ void store8(float* out, const float v[8]) {
  reinterpret_cast<float4*>(out)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(out)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

// The 16 code values (and with double quantization the 256 of the nested map) into shared memory,
// read with a warp-uniform index (a divergent index into the kernel parameters would serialize);
// blockDim 256. Ends with the block's barrier.
__device__ __forceinline__ void fill_code_tables(float* s_code, float* s_map, const Code16Param& code,
                                                 const Code256Param& map, bool nested, int lane, int warp) {
  for (int i = warp; i < 16; i += 8)
    if (lane == 0) s_code[i] = code.v[i];
  if (nested)
    for (int i = warp; i < 256; i += 8)
      if (lane == 0) s_map[i] = map.v[i];
  __syncthreads();
}

// The 8 values of 4 packed bytes (first value in the high nibble of the first byte), code · absmax
// rounded once in float32.
__device__ __forceinline__ void decode8(std::uint32_t word, const float* s_code, float amax, float v[8]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const std::uint32_t byte = (word >> (8 * j)) & 0xffu;
    v[2 * j] = __fmul_rn(s_code[byte >> 4], amax);
    v[2 * j + 1] = __fmul_rn(s_code[byte & 0xfu], amax);
  }
}

// Values [first, first + n) of the tensor (first a multiple of 8) to out[0, n).
template <class Out>
__global__ void __launch_bounds__(256)
    dequantize4_kernel(const std::uint8_t* __restrict__ packed, std::size_t first, std::size_t n,
                       int block_shift, AbsmaxView am, Code16Param code, Code256Param map,
                       Out* __restrict__ out) {
  __shared__ float s_code[16];
  __shared__ float s_map[256];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  fill_code_tables(s_code, s_map, code, map, !am.absmax, lane, warp);
  constexpr int kUnroll = 4;
  const std::size_t groups = n / 8;  // whole groups of 8; the rest is the tail below
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  const bool aligned = (reinterpret_cast<std::uintptr_t>(out) & 15) == 0;
  if (aligned) {
    for (std::size_t g0 = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; g0 < groups;
         g0 += kUnroll * stride) {
      std::uint32_t w[kUnroll];
      float amax[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const std::size_t gi = g0 + u * stride;
        w[u] = gi < groups ? __ldcs(reinterpret_cast<const unsigned int*>(packed) + first / 8 + gi) : 0u;
        amax[u] = gi < groups ? block_absmax(am, s_map, (first + gi * 8) >> block_shift) : 0.0f;
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const std::size_t gi = g0 + u * stride;
        if (gi >= groups) break;
        float v[8];
        decode8(w[u], s_code, amax[u], v);
        store8(out + gi * 8, v);
      }
    }
  }
  // the tail (and everything, for an unaligned output), one value per thread
  const std::size_t tail = aligned ? groups * 8 : 0;
  for (std::size_t i = tail + std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const std::size_t e = first + i;
    const std::uint32_t byte = packed[e / 2];
    store1(out + i, __fmul_rn(s_code[(e % 2 == 0) ? (byte >> 4) : (byte & 0xfu)],
                              block_absmax(am, s_map, e >> block_shift)));
  }
}

// The Tiles layout (quantized4bit.cuh): a warp per unit (16 rows × 64 values), a lane per 16-byte
// slice of it (16 values of row g, 16 of row g + 8, each inside one absmax block since blocks hold
// >= 32 values). The warp stages the unit's values in shared memory and writes them out row by row,
// so each store instruction covers whole rows' 128-byte (bf16) segments: stored straight from the
// slices, a store would cover 16 rows × 16 bytes and half-fill every sector (measured 10% slower
// than the rows kernel above at 14336×4096). Units [unit_first, unit_first + units) of an (N, K)
// matrix, out relative to the first unit's tile. Same arithmetic as above: bit for bit its values.
template <class Out>
__global__ void __launch_bounds__(256)
    dequantize4_tiles_kernel(const std::uint8_t* __restrict__ packed, std::size_t unit_first,
                             std::size_t units, std::size_t K, int block_shift, AbsmaxView am,
                             Code16Param code, Code256Param map, Out* __restrict__ out) {
  constexpr int kChunks = 64 * int(sizeof(Out)) / 16;  // 16-byte chunks per row of a unit
  __shared__ float s_code[16];
  __shared__ float s_map[256];
  __shared__ __align__(16) Out s_unit[8][16 * 64];  // a unit per warp
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  fill_code_tables(s_code, s_map, code, map, !am.absmax, lane, warp);
  const std::size_t KC = K / 64, row0 = unit_first / KC * 16;
  Out* su = s_unit[warp];
  const std::size_t warps = std::size_t(gridDim.x) * 8;
  for (std::size_t ui = blockIdx.x * std::size_t(8) + warp; ui < units; ui += warps) {
    const std::size_t unit = unit_first + ui;
    const uint4 v = __ldcs(reinterpret_cast<const uint4*>(packed + unit * 512) + lane);
    const std::size_t r = unit / KC * 16, k = unit % KC * 64;
    const int g = lane >> 2, t = lane & 3;
    const std::uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // row g, then row g + 8
      const float amax = block_absmax(am, s_map, ((r + g + 8 * h) * K + k + 16 * t) >> block_shift);
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        float f[8];
        decode8(w[2 * h + q], s_code, amax, f);
        store8(su + (g + 8 * h) * 64 + 16 * t + 8 * q, f);
      }
    }
    __syncwarp();
#pragma unroll
    for (int i = 0; i < kChunks / 2; ++i) {  // 32 / kChunks rows per store instruction
      const int row = i * (32 / kChunks) + lane / kChunks, c = lane % kChunks;
      *reinterpret_cast<uint4*>(out + (r + row - row0) * K + k + c * (16 / sizeof(Out))) =
          *reinterpret_cast<const uint4*>(su + row * 64 + c * (16 / sizeof(Out)));
    }
    __syncwarp();
  }
}

// The grid of a grid-stride kernel of 256 threads: `blocks` (what the work needs), at most as many as
// are resident on the device at once (more would run in waves; measured slower, docs/performance.md).
template <class Kernel>
unsigned resident_grid(const Context& ctx, Kernel kernel, std::size_t blocks) {
  int per_sm = 0;
  QLORA_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, 256, 0));
  return unsigned(std::min<std::size_t>(blocks, std::size_t(ctx.sm_count()) * std::max(per_sm, 1)));
}

inline int log2_exact(int v) {
  int s = 0;
  while ((1 << s) < v) ++s;
  return s;
}

// The table dequantization multiplies by (FP4 code 8 -> -0.0, as quant::decode_table).
inline Code16Param decode_table(const DeviceQuantized4bit& q) {
  Code16Param t;
  for (int i = 0; i < 16; ++i) t.v[i] = q.code[i];
  if (q.type == quant::Quant4Type::FP4 && t.v[codebook::kFP4SignBit] == 0.0f)
    t.v[codebook::kFP4SignBit] = -0.0f;
  return t;
}

inline AbsmaxView absmax_view(const DeviceQuantized4bit& q) {
  if (!q.double_quant) return AbsmaxView{q.absmax.data(), nullptr, nullptr, 0.0f, 0};
  return AbsmaxView{nullptr, q.qabsmax.data(), q.absmax2.data(), q.offset, log2_exact(q.nested_blocksize)};
}

inline Code256Param map_param(const DeviceQuantized4bit& q) {
  Code256Param m;
  for (int i = 0; i < 256; ++i) m.v[i] = q.nested_code[i];
  return m;
}

}  // namespace detail

// Values [first, first + count) of q (first a multiple of 8, e.g. whole rows of a matrix whose row
// length is a multiple of 8) into out[0, count): device pointer to __nv_bfloat16, __half or float
// (16-byte aligned for the Tiles layout, whose ranges are whole 16-row tiles).
// Asynchronous on `stream` (default: ctx's). The grid is the blocks resident at once (measured
// 5-12% faster on the H200 than 16 blocks per SM, which ran in two waves: docs/performance.md).
template <class Out>
void dequantize_4bit_range(const Context& ctx, const DeviceQuantized4bit& q, std::size_t first,
                           std::size_t count, Out* out, cudaStream_t stream = nullptr) {
  const std::size_t n = std::size_t(q.numel());
  QLORA_CHECK(q.packed.size() == (n + 1) / 2, "cuda::dequantize_4bit: packed has ", q.packed.size(),
              " bytes, expected ", (n + 1) / 2);
  QLORA_CHECK(q.nested_blocksize == 256 || !q.double_quant, "cuda::dequantize_4bit: nested blocksize ",
              q.nested_blocksize, ", expected 256");
  QLORA_CHECK(first % 8 == 0 && first <= n && count <= n - first, "cuda::dequantize_4bit: range [", first,
              ", ", first + count, ") of ", n, " values (the start must be a multiple of 8)");
  quant::check_blocksize4(q.blocksize);
  if (count == 0) return;
  ctx.activate();
  const cudaStream_t s = stream ? stream : ctx.stream();
  if (q.layout == Packed4Layout::Tiles) {
    const std::size_t K = std::size_t(q.cols()), tile = 16 * K;
    QLORA_CHECK(q.shape.size() == 2 && first % tile == 0 && count % tile == 0,
                "cuda::dequantize_4bit: a weight in the tiles layout dequantizes whole 16-row tiles; range [",
                first, ", ", first + count, ") of a (", q.rows(), ", ", q.cols(), ") matrix");
    QLORA_CHECK((reinterpret_cast<std::uintptr_t>(out) & 15) == 0,
                "cuda::dequantize_4bit: the output of a tiles-layout weight must be 16-byte aligned");
    const std::size_t units = count / tile * (K / 64);
    const unsigned grid = detail::resident_grid(ctx, detail::dequantize4_tiles_kernel<Out>, (units + 7) / 8);
    detail::dequantize4_tiles_kernel<Out><<<grid, 256, 0, s>>>(
        q.packed.data(), first / tile * (K / 64), units, K, detail::log2_exact(q.blocksize),
        detail::absmax_view(q), detail::decode_table(q), detail::map_param(q), out);
    QLORA_CUDA_CHECK_LAUNCH("dequantize4_tiles_kernel");
    return;
  }
  const unsigned grid =
      detail::resident_grid(ctx, detail::dequantize4_kernel<Out>, (count / 8 + 255) / 256 + 1);
  detail::dequantize4_kernel<Out>
      <<<grid, 256, 0, s>>>(q.packed.data(), first, count, detail::log2_exact(q.blocksize),
                            detail::absmax_view(q), detail::decode_table(q), detail::map_param(q), out);
  QLORA_CUDA_CHECK_LAUNCH("dequantize4_kernel");
}

// All of q: out holds numel() values.
template <class Out>
void dequantize_4bit(const Context& ctx, const DeviceQuantized4bit& q, Out* out) {
  dequantize_4bit_range(ctx, q, 0, std::size_t(q.numel()), out);
}

}  // namespace cuda
}  // namespace qlora
