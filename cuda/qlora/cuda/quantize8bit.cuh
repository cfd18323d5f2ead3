#pragma once
// 8-bit quantization on the GPU: the same bytes and scales as the CPU quantizers
//   quantize_blockwise8:   quant::quantize_blockwise8 (qlora/quant/blockwise8bit.hpp), bitsandbytes'
//                          quantize_blockwise with the dynamic map, blocks of 64 .. 4096, the last
//                          block may be partial;
//   quantize_rowwise_int8: quant::quantize_rowwise_int8 (qlora/quant/rowwise_int8.hpp), LLM.int8()'s
//                          row absmax (SCB) and codes round_half_even(x * (127 / SCB)).
// Both take float32 or bf16 input (bf16 is widened exactly, so the CPU oracle is the CPU quantizer of
// the widened values).
//
// The float operations are the CPU's, one by one, written as __fmul_rn / __frcp_rn / __fdiv_rn (and
// __dmul_rn / __ddiv_rn in the tiny-SCB path) so that contraction into an FMA cannot change a
// rounding:
//   blockwise: inv = rcp_rn(absmax) (the correctly rounded 1.0f / absmax; inf for an all-zero block,
//              where 0 * inf = NaN encodes as index 0, as on the CPU), then x * inv, then the CPU fast
//              path's binary search over the float32 midpoints (computed on the host by
//              quant::midpoints), ties to the even index. absmax is a max, so any reduction order
//              gives the CPU's value.
//   row-wise:  s = 127.0f / SCB correctly rounded (0 for a zero row), rint(x * s) (round half to
//              even), clamped to [-127, 127]; where 127 / SCB overflows (SCB < ~3.7e-37) the code is
//              computed in double as x * 127.0 / SCB, exactly as quant::encode_int8 does.
// Subnormal inputs keep their CPU codes only without -ftz=true (part of --use_fast_math), which
// would flush them to zero (a block of subnormals has an inf reciprocal on the CPU, not a NaN).
//
// A NaN / inf input throws qlora::Error naming `what`, the index of the first such value and the
// value, as the CPU quantizers (and cuda::quantize_4bit) do.
#include <cuda_bf16.h>

#include <cfloat>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "qlora/cuda/context.cuh"
#include "qlora/cuda/quantize4bit.cuh"  // detail::load8, detail::to_f32, detail::host_value, Code256Param
#include "qlora/cuda/quantized8bit.cuh"

namespace qlora {
namespace cuda {
namespace detail {

// The CPU fast path's search (quant::detail::encode_dynamic_block): the number of midpoints strictly
// below x (s_mid[255] = +inf ends every search), then a value exactly on a midpoint with an odd lower
// index moves up to the even index. The `idx < 255` guard is the CPU's: x = +inf (a finite x times
// the inf reciprocal of a subnormal absmax) sits "on" the +inf sentinel and stays at 255. NaN fails
// every comparison: index 0.
__device__ __forceinline__ std::uint32_t encode_dynamic(const float* s_mid, float x) {
  std::uint32_t idx = 0;
#pragma unroll
  for (std::uint32_t step = 128; step >= 1; step >>= 1)
    if (x > s_mid[idx + step - 1]) idx += step;
  if (idx < 255 && (idx & 1u) && x == s_mid[idx]) ++idx;
  return idx;
}

// As quant::encode_int8: s <= FLT_MAX is false only for the inf scale of a tiny SCB.
__device__ __forceinline__ std::int8_t encode_int8(float x, float s, float amax) {
  const float v = s <= FLT_MAX ? rintf(__fmul_rn(x, s))
                               : float(rint(__ddiv_rn(__dmul_rn(double(x), 127.0), double(amax))));
  return std::int8_t(fmaxf(-127.0f, fminf(127.0f, v)));
}

// A thread owns 8 consecutive values (one 8-byte store of codes); the BS / 8 threads of one
// quantization block reduce its absmax with shuffles, through shared memory above 256-value blocks.
// grid: enough threads for ceil(n / 8); blockDim max(256, BS / 8), so the 256 midpoints fill
// shared memory in one step.
template <int BS, class In>
__global__ void quantize8_kernel(const In* __restrict__ x, std::size_t n, Code256Param mid,
                                 std::uint8_t* __restrict__ codes, float* __restrict__ absmax,
                                 unsigned long long* first_bad) {
  __shared__ float s_mid[256];
  if (threadIdx.x < 256) s_mid[threadIdx.x] = mid.v[threadIdx.x];
  __syncthreads();
  const std::size_t i0 = (std::size_t(blockIdx.x) * blockDim.x + threadIdx.x) * 8;
  float v[8];
  const float amax = load8_block_absmax<BS>(x, i0, n, v, first_bad);
  if (i0 >= n) return;
  if (i0 % BS == 0) absmax[i0 / BS] = amax;
  const float inv = __frcp_rn(amax);
  std::uint32_t lo = 0, hi = 0;  // bytes 0..3 and 4..7, element j in byte j
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    lo |= encode_dynamic(s_mid, __fmul_rn(v[j], inv)) << (8 * j);
    hi |= encode_dynamic(s_mid, __fmul_rn(v[j + 4], inv)) << (8 * j);
  }
  if (i0 + 8 <= n) {
    *reinterpret_cast<uint2*>(codes + i0) = make_uint2(lo, hi);  // i0 is a multiple of 8
  } else {
    for (int j = 0; j < 8 && i0 + j < n; ++j)
      codes[i0 + j] = std::uint8_t((j < 4 ? lo : hi) >> (8 * (j % 4)));
  }
}

template <int BS, class In>
void launch_quantize8(const In* x, std::size_t n, const Code256Param& mid, std::uint8_t* codes, float* absmax,
                      unsigned long long* first_bad, cudaStream_t stream) {
  const std::size_t threads_needed = (n + 7) / 8;
  const unsigned block = BS / 8 > 256 ? BS / 8 : 256;
  const std::size_t grid = (threads_needed + block - 1) / block;
  quantize8_kernel<BS, In><<<unsigned(grid), block, 0, stream>>>(x, n, mid, codes, absmax, first_bad);
  QLORA_CUDA_CHECK_LAUNCH("quantize8_kernel");
}

template <class In>
void dispatch_quantize8(int bs, const In* x, std::size_t n, const Code256Param& mid, std::uint8_t* codes,
                        float* absmax, unsigned long long* first_bad, cudaStream_t s) {
  switch (bs) {
    case 64: return launch_quantize8<64>(x, n, mid, codes, absmax, first_bad, s);
    case 128: return launch_quantize8<128>(x, n, mid, codes, absmax, first_bad, s);
    case 256: return launch_quantize8<256>(x, n, mid, codes, absmax, first_bad, s);
    case 512: return launch_quantize8<512>(x, n, mid, codes, absmax, first_bad, s);
    case 1024: return launch_quantize8<1024>(x, n, mid, codes, absmax, first_bad, s);
    case 2048: return launch_quantize8<2048>(x, n, mid, codes, absmax, first_bad, s);
    case 4096: return launch_quantize8<4096>(x, n, mid, codes, absmax, first_bad, s);
    default: quant::check_blocksize8(bs);
  }
}

// One CUDA block per row (grid-stride over rows): pass 1 reduces SCB, pass 2 reads the row again
// (from L2: a row of a weight is a few KiB) and writes the codes. A thread owns groups of 8 columns.
constexpr int kRowThreads = 256;
template <class In>
__global__ void __launch_bounds__(kRowThreads)
    quantize_rowwise_int8_kernel(const In* __restrict__ x, std::int64_t rows, std::int64_t cols,
                                 std::int8_t* __restrict__ q, float* __restrict__ scb,
                                 unsigned long long* first_bad) {
  __shared__ float warp_max[kRowThreads / 32];
  const std::size_t ncols = std::size_t(cols);
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const In* row = x + std::size_t(r) * ncols;
    std::int8_t* qr = q + std::size_t(r) * ncols;
    float amax = 0.0f;
    std::size_t bad = ncols;  // this thread's first non-finite column
    for (std::size_t c0 = std::size_t(threadIdx.x) * 8; c0 < ncols; c0 += kRowThreads * 8) {
      float v[8];
      load8(row, c0, ncols, v);  // zeros past the row's end
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (!isfinite(v[j]) && bad == ncols) bad = c0 + j;
        amax = fmaxf(amax, fabsf(v[j]));
      }
    }
    if (bad < ncols) atomicMin(first_bad, static_cast<unsigned long long>(std::size_t(r) * ncols + bad));
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = amax;
    __syncthreads();
    amax = warp_max[0];
#pragma unroll
    for (int w = 1; w < kRowThreads / 32; ++w) amax = fmaxf(amax, warp_max[w]);
    __syncthreads();  // warp_max is rewritten by the next row
    if (threadIdx.x == 0) scb[r] = amax;
    const float s = amax > 0.0f ? __fdiv_rn(127.0f, amax) : 0.0f;  // quant::row_scale
    const bool aligned = (reinterpret_cast<std::uintptr_t>(qr) & 7) == 0;
    for (std::size_t c0 = std::size_t(threadIdx.x) * 8; c0 < ncols; c0 += kRowThreads * 8) {
      float v[8];
      load8(row, c0, ncols, v);
      std::uint32_t lo = 0, hi = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        lo |= std::uint32_t(std::uint8_t(encode_int8(v[j], s, amax))) << (8 * j);
        hi |= std::uint32_t(std::uint8_t(encode_int8(v[j + 4], s, amax))) << (8 * j);
      }
      if (aligned && c0 + 8 <= ncols) {
        *reinterpret_cast<uint2*>(qr + c0) = make_uint2(lo, hi);
      } else {
        for (int j = 0; j < 8 && c0 + j < ncols; ++j)
          qr[c0 + j] = std::int8_t(std::uint8_t((j < 4 ? lo : hi) >> (8 * (j % 4))));
      }
    }
  }
}

// Reads the first non-finite index back (blocking) and throws naming it and its value.
template <class In>
void throw_if_not_finite(const unsigned long long* first_bad, const In* x, const std::string& what,
                         cudaStream_t s) {
  unsigned long long bad = 0;
  QLORA_CUDA_CHECK(cudaMemcpyAsync(&bad, first_bad, sizeof bad, cudaMemcpyDeviceToHost, s));
  QLORA_CUDA_CHECK(cudaStreamSynchronize(s));
  if (bad != std::numeric_limits<unsigned long long>::max())
    throw_error(what, ": value ", bad, " is ", host_value(x, std::size_t(bad), s),
                ", expected a finite number");
}

}  // namespace detail

// x: device pointer, (n) float32 or bf16. Returns the codes and absmax on the device; blocks until
// they are complete (it reads the NaN check back to the host).
template <class In>
DeviceBlockwise8 quantize_blockwise8(const Context& ctx, const In* x, std::size_t n, int blocksize,
                                     const quant::Code256& code = quant::dynamic_map_signed(),
                                     const std::string& what = "tensor") {
  static_assert(std::is_same<In, float>::value || std::is_same<In, __nv_bfloat16>::value,
                "cuda::quantize_blockwise8: input must be float or __nv_bfloat16");
  quant::check_blocksize8(blocksize);
  ctx.activate();
  const cudaStream_t s = ctx.stream();
  DeviceBlockwise8 q;
  q.blocksize = blocksize;
  q.code = code;
  q.codes = DeviceBuffer<std::uint8_t>(n);
  q.absmax = DeviceBuffer<float>(quant::num_blocks(n, blocksize));
  DeviceBuffer<unsigned long long> first_bad(1);
  QLORA_CUDA_CHECK(cudaMemsetAsync(first_bad.data(), 0xff, sizeof(unsigned long long), s));
  if (n > 0) {
    detail::Code256Param mid;
    const auto m = quant::midpoints(code);  // the CPU fast path's table, same float operations
    for (int i = 0; i < 256; ++i) mid.v[i] = m[i];
    detail::dispatch_quantize8(blocksize, x, n, mid, q.codes.data(), q.absmax.data(), first_bad.data(), s);
  }
  detail::throw_if_not_finite(first_bad.data(), x, what, s);
  return q;
}

// x: device pointer, (rows, cols) row-major, float32 or bf16. Returns codes and SCB on the device;
// blocks until they are complete.
template <class In>
DeviceRowwiseInt8 quantize_rowwise_int8(const Context& ctx, const In* x, std::int64_t rows, std::int64_t cols,
                                        const std::string& what = "tensor") {
  static_assert(std::is_same<In, float>::value || std::is_same<In, __nv_bfloat16>::value,
                "cuda::quantize_rowwise_int8: input must be float or __nv_bfloat16");
  QLORA_CHECK(rows >= 0 && cols >= 0, what, ": row-wise int8 needs a non-negative shape, got (", rows, ", ",
              cols, ")");
  ctx.activate();
  const cudaStream_t s = ctx.stream();
  DeviceRowwiseInt8 q;
  q.rows = rows;
  q.cols = cols;
  q.q = DeviceBuffer<std::int8_t>(std::size_t(rows * cols));
  q.scb = DeviceBuffer<float>(std::size_t(rows));
  DeviceBuffer<unsigned long long> first_bad(1);
  QLORA_CUDA_CHECK(cudaMemsetAsync(first_bad.data(), 0xff, sizeof(unsigned long long), s));
  if (rows > 0) {  // cols == 0 still writes SCB = 0 for every row, as the CPU does
    const std::int64_t cap = std::int64_t(ctx.sm_count()) * 32;
    const unsigned grid = unsigned(rows < cap ? rows : cap);
    detail::quantize_rowwise_int8_kernel<In>
        <<<grid, detail::kRowThreads, 0, s>>>(x, rows, cols, q.q.data(), q.scb.data(), first_bad.data());
    QLORA_CUDA_CHECK_LAUNCH("quantize_rowwise_int8_kernel");
  }
  detail::throw_if_not_finite(first_bad.data(), x, what, s);
  return q;
}

}  // namespace cuda
}  // namespace qlora
