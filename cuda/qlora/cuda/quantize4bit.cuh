#pragma once
// NF4 / FP4 quantization on the GPU, with optional double quantization: the same bytes as
// quant::quantize_4bit on the CPU (the reference in qlora/quant/blockwise4bit.hpp; docs/formats.md).
//
// Three kernels, in bitsandbytes' order:
//   1. quantize4_kernel: per block absmax (max |x| over the real values) and the packed codes;
//      a thread owns 8 consecutive values (4 packed bytes), the threads of one block reduce absmax
//      with shuffles (and through shared memory above 256-value blocks). The scaling is
//      x * rcp_rn(absmax), the correctly rounded reciprocal, as on the CPU.
//   2. mean_absmax_kernel (double quant): the offset, in exactly quant::ref::mean_absmax's order,
//      which is one warp's order (32 strided lane sums, then a butterfly): one warp adds while the
//      rest of its block streams the values into shared memory.
//   3. quantize_nested_kernel (double quant): absmax - offset quantized to 8 bits with the dynamic
//      map in blocks of 256, by the same binary search over the midpoints as the CPU fast path.
// The float operations are written as __fmul_rn / __fadd_rn / __frcp_rn so that neither contraction
// into an FMA nor fast-math flags can change a rounding.
//
// A NaN / inf input throws qlora::Error naming `what`, the index of the first such value and the
// value, as the CPU quantizer does.
#include <cuda_bf16.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "qlora/cuda/codes4bit.cuh"
#include "qlora/cuda/context.cuh"
#include "qlora/cuda/quantized4bit.cuh"
#include "qlora/cuda/to_f32.cuh"

namespace qlora {
namespace cuda {
namespace detail {

// v[0..8) = x[i0 .. i0 + 8), 0 beyond n.
__device__ __forceinline__ void load8(const float* x, std::size_t i0, std::size_t n, float v[8]) {
  if (i0 + 8 <= n && (reinterpret_cast<std::uintptr_t>(x) & 15) == 0) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(x + i0));
    const float4 b = __ldg(reinterpret_cast<const float4*>(x + i0) + 1);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = i0 + j < n ? x[i0 + j] : 0.0f;
  }
}
__device__ __forceinline__ void load8(const __nv_bfloat16* x, std::size_t i0, std::size_t n, float v[8]) {
  if (i0 + 8 <= n && (reinterpret_cast<std::uintptr_t>(x) & 15) == 0) {
    const uint4 a = __ldg(reinterpret_cast<const uint4*>(x + i0));
    const std::uint32_t w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      v[2 * j] = __uint_as_float(w[j] << 16);
      v[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = i0 + j < n ? __bfloat162float(x[i0 + j]) : 0.0f;
  }
}

// This thread's 8 values (v; zeros past n, which take part in the reductions) and the absmax of its
// quantization block of BS values (BS / 8 consecutive threads); the first non-finite index goes to
// first_bad. Every thread of the CUDA block must call it (it synchronizes when BS > 256).
template <int BS, class In>
__device__ __forceinline__ float load8_block_absmax(const In* __restrict__ x, std::size_t i0, std::size_t n,
                                                    float (&v)[8], unsigned long long* first_bad) {
  constexpr int kThreadsPerBlock = BS / 8;  // threads sharing one quantization block
  load8(x, i0, n, v);                       // threads past n take part in the reductions with zeros
  float amax = 0.0f;
  unsigned bad = 8;
#pragma unroll
  for (int j = 7; j >= 0; --j) {
    if (!isfinite(v[j])) bad = j;
    amax = fmaxf(amax, fabsf(v[j]));
  }
  if (bad < 8) atomicMin(first_bad, static_cast<unsigned long long>(i0 + bad));
#pragma unroll
  for (int off = (kThreadsPerBlock < 32 ? kThreadsPerBlock : 32) / 2; off > 0; off >>= 1)
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  if constexpr (kThreadsPerBlock > 32) {
    constexpr int kWarps = (kThreadsPerBlock > 256 ? kThreadsPerBlock : 256) / 32;  // of the CUDA block
    __shared__ float warp_max[kWarps];
    if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = amax;
    __syncthreads();
    const int first = int(threadIdx.x / kThreadsPerBlock) * (kThreadsPerBlock / 32);  // this block's warps
    amax = warp_max[first];
#pragma unroll
    for (int w = 1; w < kThreadsPerBlock / 32; ++w) amax = fmaxf(amax, warp_max[first + w]);
  }
  return amax;
}

// grid: enough threads for ceil(n / 8) (blockDim 256 when BS <= 256, else BS / 8)
template <bool NF4, int BS, class In>
__global__ void quantize4_kernel(const In* __restrict__ x, std::size_t n, std::uint8_t* __restrict__ packed,
                                 float* __restrict__ absmax, unsigned long long* first_bad) {
  const std::size_t i0 = (std::size_t(blockIdx.x) * blockDim.x + threadIdx.x) * 8;
  float v[8];
  const float amax = load8_block_absmax<BS>(x, i0, n, v, first_bad);
  if (i0 >= n) return;
  if (i0 % BS == 0) absmax[i0 / BS] = amax;
  const float inv = __frcp_rn(amax);  // 1.0f / absmax, correctly rounded (inf for an all-zero block)
  std::uint32_t word = 0;             // byte q = element 2q (high nibble) | element 2q + 1 (low)
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    word |= encode4<NF4>(__fmul_rn(v[2 * q], inv)) << (8 * q + 4);
    word |= encode4<NF4>(__fmul_rn(v[2 * q + 1], inv)) << (8 * q);
  }
  if (i0 + 8 <= n) {
    *reinterpret_cast<std::uint32_t*>(packed + i0 / 2) = word;
  } else {  // the tail: only bytes < (n + 1) / 2 exist; an odd n pads with the code of 0 * inv
    const std::size_t nbytes = (n + 1) / 2;
    for (int q = 0; q < 4 && i0 / 2 + q < nbytes; ++q) packed[i0 / 2 + q] = std::uint8_t(word >> (8 * q));
  }
}

// offset = mean(absmax) in quant::ref::mean_absmax's exact order of float additions: warp 0 keeps the
// 32 lane sums and adds the values in order, out of shared memory, while the other 31 warps of the
// block stream the next chunk in (the sum is sequential by construction; the loads need not be).
constexpr int kMeanThreads = 1024;
constexpr int kMeanChunk = 4096;  // a multiple of 32, so every chunk starts at lane 0
__global__ void __launch_bounds__(kMeanThreads)
    mean_absmax_kernel(const float* __restrict__ absmax, std::size_t nb, float inv_n,
                       float* __restrict__ offset) {
  __shared__ float buf[2][kMeanChunk];
  const int tid = threadIdx.x;
  const std::size_t chunks = (nb + kMeanChunk - 1) / kMeanChunk;
  auto load = [&](std::size_t c, int first, int stride) {
    const std::size_t base = c * kMeanChunk;
    for (int i = first; i < kMeanChunk && base + i < nb; i += stride)
      buf[c & 1][i] = __ldg(absmax + base + i);
  };
  load(0, tid, kMeanThreads);
  __syncthreads();
  float s = 0.0f;
  for (std::size_t c = 0; c < chunks; ++c) {
    if (tid >= 32) {
      if (c + 1 < chunks) load(c + 1, tid - 32, kMeanThreads - 32);
    } else {
      const std::size_t base = c * kMeanChunk;
      const int len = int(nb - base < std::size_t(kMeanChunk) ? nb - base : std::size_t(kMeanChunk));
      for (int i = tid; i < len; i += 32) s = __fadd_rn(s, buf[c & 1][i]);
    }
    __syncthreads();
  }
  if (tid < 32) {
#pragma unroll
    for (int off = 16; off >= 1; off >>= 1) s = __fadd_rn(s, __shfl_down_sync(0xffffffffu, s, off));
    if (tid == 0) *offset = __fmul_rn(s, inv_n);
  }
}

// One CUDA block of 256 threads per nested block of 256 absmax values.
__global__ void quantize_nested_kernel(const float* __restrict__ absmax, std::size_t nb,
                                       const float* __restrict__ offset, Code256Param mid,
                                       std::uint8_t* __restrict__ qabsmax, float* __restrict__ absmax2) {
  __shared__ float s_mid[256];
  __shared__ float warp_max[8];
  s_mid[threadIdx.x] = mid.v[threadIdx.x];
  const std::size_t i = std::size_t(blockIdx.x) * 256 + threadIdx.x;
  const float v = i < nb ? __fsub_rn(absmax[i], *offset) : 0.0f;
  float amax = fabsf(v);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = amax;
  __syncthreads();
  amax = warp_max[0];
#pragma unroll
  for (int w = 1; w < 8; ++w) amax = fmaxf(amax, warp_max[w]);
  if (threadIdx.x == 0) absmax2[blockIdx.x] = amax;
  if (i >= nb) return;
  const float x = __fmul_rn(v, __frcp_rn(amax));
  unsigned idx = 0;  // number of midpoints strictly below x (s_mid[255] = +inf)
#pragma unroll
  for (unsigned step = 128; step >= 1; step >>= 1)
    if (x > s_mid[idx + step - 1]) idx += step;
  if ((idx & 1u) && x == s_mid[idx]) ++idx;  // exactly on a midpoint: the even index
  qabsmax[i] = std::uint8_t(idx);
}

template <bool NF4, int BS, class In>
void launch_quantize4(const In* x, std::size_t n, std::uint8_t* packed, float* absmax,
                      unsigned long long* first_bad, cudaStream_t stream) {
  const std::size_t threads_needed = (n + 7) / 8;
  const unsigned block = BS / 8 > 256 ? BS / 8 : 256;
  const std::size_t grid = (threads_needed + block - 1) / block;
  quantize4_kernel<NF4, BS, In><<<unsigned(grid), block, 0, stream>>>(x, n, packed, absmax, first_bad);
  QLORA_CUDA_CHECK_LAUNCH("quantize4_kernel");
}

template <bool NF4, class In>
void dispatch_quantize4(int bs, const In* x, std::size_t n, std::uint8_t* packed, float* absmax,
                        unsigned long long* first_bad, cudaStream_t s) {
  switch (bs) {
    case 32: return launch_quantize4<NF4, 32>(x, n, packed, absmax, first_bad, s);
    case 64: return launch_quantize4<NF4, 64>(x, n, packed, absmax, first_bad, s);
    case 128: return launch_quantize4<NF4, 128>(x, n, packed, absmax, first_bad, s);
    case 256: return launch_quantize4<NF4, 256>(x, n, packed, absmax, first_bad, s);
    case 512: return launch_quantize4<NF4, 512>(x, n, packed, absmax, first_bad, s);
    case 1024: return launch_quantize4<NF4, 1024>(x, n, packed, absmax, first_bad, s);
    case 2048: return launch_quantize4<NF4, 2048>(x, n, packed, absmax, first_bad, s);
    case 4096: return launch_quantize4<NF4, 4096>(x, n, packed, absmax, first_bad, s);
    default: quant::check_blocksize4(bs);
  }
}

inline float host_value(const float* x, std::size_t i, cudaStream_t s) {
  float v = 0.0f;
  QLORA_CUDA_CHECK(cudaMemcpyAsync(&v, x + i, sizeof v, cudaMemcpyDeviceToHost, s));
  QLORA_CUDA_CHECK(cudaStreamSynchronize(s));
  return v;
}
inline float host_value(const __nv_bfloat16* x, std::size_t i, cudaStream_t s) {
  std::uint16_t b = 0;
  QLORA_CUDA_CHECK(cudaMemcpyAsync(&b, x + i, sizeof b, cudaMemcpyDeviceToHost, s));
  QLORA_CUDA_CHECK(cudaStreamSynchronize(s));
  return bits_float(std::uint32_t(b) << 16);
}

}  // namespace detail

// x: device pointer, (shape) row-major, float32 or bf16. Returns the quantized tensor on the device;
// blocks until it is complete (it reads the offset and the NaN check back to the host).
template <class In>
DeviceQuantized4bit quantize_4bit(const Context& ctx, const In* x, std::vector<std::int64_t> shape,
                                  const quant::Quant4Config& cfg, const std::string& what = "tensor") {
  static_assert(std::is_same<In, float>::value || std::is_same<In, __nv_bfloat16>::value,
                "cuda::quantize_4bit: input must be float or __nv_bfloat16");
  quant::check_blocksize4(cfg.blocksize);
  ctx.activate();
  const cudaStream_t s = ctx.stream();
  DeviceQuantized4bit q;
  q.type = cfg.type;
  q.blocksize = cfg.blocksize;
  q.shape = std::move(shape);
  q.dtype = std::is_same<In, float>::value ? "float32" : "bfloat16";
  q.code = quant::code4(cfg.type);
  const std::size_t n = std::size_t(q.numel()), nb = q.blocks();
  q.packed = DeviceBuffer<std::uint8_t>((n + 1) / 2);
  DeviceBuffer<float> absmax(nb);
  DeviceBuffer<unsigned long long> first_bad(1);
  QLORA_CUDA_CHECK(cudaMemsetAsync(first_bad.data(), 0xff, sizeof(unsigned long long), s));
  if (n > 0) {
    if (cfg.type == quant::Quant4Type::NF4)
      detail::dispatch_quantize4<true>(cfg.blocksize, x, n, q.packed.data(), absmax.data(), first_bad.data(),
                                       s);
    else
      detail::dispatch_quantize4<false>(cfg.blocksize, x, n, q.packed.data(), absmax.data(), first_bad.data(),
                                        s);
  }
  unsigned long long bad = 0;
  QLORA_CUDA_CHECK(cudaMemcpyAsync(&bad, first_bad.data(), sizeof bad, cudaMemcpyDeviceToHost, s));
  QLORA_CUDA_CHECK(cudaStreamSynchronize(s));
  if (bad != std::numeric_limits<unsigned long long>::max())
    throw_error(what, ": value ", bad, " is ", detail::host_value(x, std::size_t(bad), s),
                ", expected a finite number");
  if (!cfg.double_quant) {
    q.absmax = std::move(absmax);
    return q;
  }
  q.double_quant = true;
  q.nested_blocksize = codebook::kNestedBlocksize;
  q.nested_code = quant::dynamic_map_signed();
  const std::size_t nb2 = quant::num_blocks(nb, q.nested_blocksize);
  q.qabsmax = DeviceBuffer<std::uint8_t>(nb);
  q.absmax2 = DeviceBuffer<float>(nb2);
  if (nb == 0) return q;
  DeviceBuffer<float> offset(1);
  detail::mean_absmax_kernel<<<1, detail::kMeanThreads, 0, s>>>(absmax.data(), nb, 1.0f / float(nb),
                                                                offset.data());
  QLORA_CUDA_CHECK_LAUNCH("mean_absmax_kernel");
  detail::Code256Param mid;
  const auto m = quant::midpoints(q.nested_code);
  for (int i = 0; i < 256; ++i) mid.v[i] = m[i];
  detail::quantize_nested_kernel<<<unsigned(nb2), 256, 0, s>>>(absmax.data(), nb, offset.data(), mid,
                                                               q.qabsmax.data(), q.absmax2.data());
  QLORA_CUDA_CHECK_LAUNCH("quantize_nested_kernel");
  QLORA_CUDA_CHECK(cudaMemcpyAsync(&q.offset, offset.data(), sizeof(float), cudaMemcpyDeviceToHost, s));
  QLORA_CUDA_CHECK(cudaStreamSynchronize(s));
  return q;
}

}  // namespace cuda
}  // namespace qlora
