#pragma once
// rms_error: sqrt(Σ (got[i] - ref[i])² / n) over device arrays, accumulated in double: the
// requantization error a merge reports (lora/lora_linear.hpp: MergeReport), computed as the CPU's
// BaseWeight::requantize computes it. `diff` names where the difference is taken, as each format's
// CPU code does: in float (4-bit and int8 bases: double(back - merged)) or in double (dense bases:
// double(back) - double(merged)).
//
// Deterministic and independent of the device: a fixed grid of kRmsBlocks blocks, each thread a
// fixed strided range, a fixed tree in shared memory, and the block sums added on the host in block
// order. The order is not the CPU's sequential one, so the two agree to double rounding (~1e-16
// relative), not bit for bit.
#include <cuda_bf16.h>

#include <cmath>
#include <cstddef>
#include <vector>

#include "qlora/cuda/buffer.cuh"
#include "qlora/cuda/context.cuh"
#include "qlora/cuda/to_f32.cuh"

namespace qlora {
namespace cuda {

enum class DiffIn { Float, Double };

namespace detail {

constexpr int kRmsBlocks = 256, kRmsThreads = 256;

template <class T, DiffIn D>
__global__ void __launch_bounds__(kRmsThreads)
    sq_diff_kernel(const T* __restrict__ got, const float* __restrict__ ref, std::size_t n,
                   double* __restrict__ out) {
  __shared__ double s[kRmsThreads];
  const std::size_t stride = std::size_t(kRmsBlocks) * kRmsThreads;
  double acc = 0.0;
  for (std::size_t i = std::size_t(blockIdx.x) * kRmsThreads + threadIdx.x; i < n; i += stride) {
    const double d = D == DiffIn::Float ? double(__fsub_rn(to_f32(got[i]), ref[i]))
                                        : __dsub_rn(double(to_f32(got[i])), double(ref[i]));
    acc = __fma_rn(d, d, acc);
  }
  s[threadIdx.x] = acc;
  __syncthreads();
  for (int w = kRmsThreads / 2; w > 0; w >>= 1) {
    if (int(threadIdx.x) < w) s[threadIdx.x] = __dadd_rn(s[threadIdx.x], s[threadIdx.x + w]);
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = s[0];
}

}  // namespace detail

// got: (n) float or bf16, ref: (n) float, device pointers. Blocks (returns a host value); 0 for n = 0.
template <class T>
double rms_error(const Context& ctx, const T* got, const float* ref, std::size_t n, DiffIn diff) {
  if (n == 0) return 0.0;
  ctx.activate();
  DeviceBuffer<double> part(detail::kRmsBlocks);
  if (diff == DiffIn::Float)
    detail::sq_diff_kernel<T, DiffIn::Float>
        <<<detail::kRmsBlocks, detail::kRmsThreads, 0, ctx.stream()>>>(got, ref, n, part.data());
  else
    detail::sq_diff_kernel<T, DiffIn::Double>
        <<<detail::kRmsBlocks, detail::kRmsThreads, 0, ctx.stream()>>>(got, ref, n, part.data());
  QLORA_CUDA_CHECK_LAUNCH("sq_diff_kernel");
  const std::vector<double> p = part.to_host(ctx.stream());
  double se = 0.0;
  for (double v : p) se += v;
  return std::sqrt(se / double(n));
}

}  // namespace cuda
}  // namespace qlora
