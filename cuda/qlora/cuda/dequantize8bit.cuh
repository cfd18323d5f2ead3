#pragma once
// 8-bit -> bf16 / fp16 / float on the GPU, bit for bit what quant::dequantize computes on the CPU:
//   blockwise: out = code[q] * absmax, one float32 rounding, then one rounding to the output type;
//   row-wise:  out = (float(q) * SCB) * float32(1/127), two float32 roundings in that order (as
//              bitsandbytes' int8_vectorwise_dequant), then one to the output type.
// Written as __fmul_rn so that no FMA or fast-math flag changes a rounding.
//
// Memory-bound: a thread turns 8 codes (one 8-byte load) into one 16-byte (bf16) or 32-byte
// (float) store; a group of 8 never straddles a scale, since blocks hold at least 64 values and the
// row-wise fast path is taken only when cols is a multiple of 8. Other shapes, and outputs that are
// not 16-byte aligned, go one value per thread.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "qlora/cuda/context.cuh"
#include "qlora/cuda/dequantize4bit.cuh"  // detail::store1, detail::store8, detail::log2_exact
#include "qlora/cuda/quantized8bit.cuh"

namespace qlora {
namespace cuda {
namespace detail {

constexpr int kDequant8Threads = 256;

// The 256-value map sits in shared memory (per-thread indices into kernel parameters would
// serialize); grid-stride over groups of 8 codes.
template <class Out>
__global__ void __launch_bounds__(kDequant8Threads)
    dequantize_blockwise8_kernel(const std::uint8_t* __restrict__ codes, std::size_t n, int block_shift,
                                 const float* __restrict__ absmax, Code256Param code, Out* __restrict__ out) {
  __shared__ float s_code[256];
  s_code[threadIdx.x] = code.v[threadIdx.x];
  __syncthreads();
  const std::size_t groups = n / 8;
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  const bool aligned = (reinterpret_cast<std::uintptr_t>(out) & 15) == 0;
  if (aligned) {
    for (std::size_t g = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
      const uint2 w = __ldcs(reinterpret_cast<const uint2*>(codes) + g);
      const float amax = __ldg(absmax + ((g * 8) >> block_shift));
      float v[8];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        v[j] = __fmul_rn(s_code[(w.x >> (8 * j)) & 0xffu], amax);
        v[j + 4] = __fmul_rn(s_code[(w.y >> (8 * j)) & 0xffu], amax);
      }
      store8(out + g * 8, v);
    }
  }
  const std::size_t first = aligned ? groups * 8 : 0;
  for (std::size_t i = first + std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    store1(out + i, __fmul_rn(s_code[codes[i]], __ldg(absmax + (i >> block_shift))));
}

__device__ __forceinline__ float dequant_int8(std::int8_t q, float scb) {
  return __fmul_rn(__fmul_rn(float(q), scb), quant::kInv127);
}

// Flat over the (rows, cols) elements: one row lookup per group of 8 (cols % 8 == 0) or per value.
template <class Out>
__global__ void __launch_bounds__(kDequant8Threads)
    dequantize_rowwise_int8_kernel(const std::int8_t* __restrict__ q, const float* __restrict__ scb,
                                   std::size_t n, std::size_t cols, Out* __restrict__ out) {
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  const bool vec = cols % 8 == 0 && (reinterpret_cast<std::uintptr_t>(out) & 15) == 0;
  if (vec) {
    for (std::size_t g = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; g < n / 8; g += stride) {
      const uint2 w = __ldcs(reinterpret_cast<const uint2*>(q) + g);
      const float s = __ldg(scb + (g * 8) / cols);
      float v[8];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        v[j] = dequant_int8(std::int8_t(std::uint8_t(w.x >> (8 * j))), s);
        v[j + 4] = dequant_int8(std::int8_t(std::uint8_t(w.y >> (8 * j))), s);
      }
      store8(out + g * 8, v);
    }
    return;  // n is a multiple of 8 here
  }
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    store1(out + i, dequant_int8(q[i], __ldg(scb + i / cols)));
}

inline unsigned dequant8_grid(const Context& ctx, std::size_t n) {
  const std::size_t want = (n / 8 + kDequant8Threads - 1) / kDequant8Threads + 1;
  return unsigned(std::min<std::size_t>(want, std::size_t(ctx.sm_count()) * 16));
}

}  // namespace detail

// out: device pointer, (numel) values of __nv_bfloat16, __half or float. Asynchronous on ctx's stream.
template <class Out>
void dequantize_blockwise8(const Context& ctx, const DeviceBlockwise8& q, Out* out) {
  const std::size_t n = q.numel();
  quant::check_blocksize8(q.blocksize);
  QLORA_CHECK(q.absmax.size() == q.blocks(), "cuda::dequantize_blockwise8: ", q.absmax.size(),
              " absmax values for ", n, " values in blocks of ", q.blocksize, ", expected ", q.blocks());
  if (n == 0) return;
  ctx.activate();
  detail::Code256Param code;
  for (int i = 0; i < 256; ++i) code.v[i] = q.code[i];
  detail::dequantize_blockwise8_kernel<Out>
      <<<detail::dequant8_grid(ctx, n), detail::kDequant8Threads, 0, ctx.stream()>>>(
          q.codes.data(), n, detail::log2_exact(q.blocksize), q.absmax.data(), code, out);
  QLORA_CUDA_CHECK_LAUNCH("dequantize_blockwise8_kernel");
}

// out: device pointer, (rows, cols) values of __nv_bfloat16, __half or float. Asynchronous.
template <class Out>
void dequantize_rowwise_int8(const Context& ctx, const DeviceRowwiseInt8& q, Out* out) {
  QLORA_CHECK(q.rows >= 0 && q.cols >= 0 && q.q.size() == std::size_t(q.rows * q.cols) &&
                  q.scb.size() == std::size_t(q.rows),
              "cuda::dequantize_rowwise_int8: ", q.q.size(), " codes and ", q.scb.size(),
              " scales, expected ", q.rows * q.cols, " and ", q.rows, " for shape (", q.rows, ", ", q.cols,
              ")");
  const std::size_t n = std::size_t(q.numel());
  if (n == 0) return;
  ctx.activate();
  detail::dequantize_rowwise_int8_kernel<Out>
      <<<detail::dequant8_grid(ctx, n), detail::kDequant8Threads, 0, ctx.stream()>>>(
          q.q.data(), q.scb.data(), n, std::size_t(q.cols), out);
  QLORA_CUDA_CHECK_LAUNCH("dequantize_rowwise_int8_kernel");
}

}  // namespace cuda
}  // namespace qlora
