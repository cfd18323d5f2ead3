#pragma once
// The residual adds of a decoder layer: out (n) fp32 = x fp32 + y bf16, the stream kept in fp32 (as
// the CPU model's) while the sublayer outputs come from bf16 products. out may alias x.
//
// Backward needs no kernel: d out flows to x unchanged and to y as a bf16 copy (cast_to_bf16).
#include <cuda_bf16.h>

#include <cstddef>

#include "qlora/cuda/context.cuh"
#include "qlora/cuda/model/block_reduce.cuh"

namespace qlora {
namespace cuda {
namespace detail {

__global__ void __launch_bounds__(256)
    residual_add_kernel(const float* x, const __nv_bfloat16* __restrict__ y, std::size_t n, float* out) {
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = x[i] + __bfloat162float(y[i]);
}

}  // namespace detail

inline void residual_add(const Context& ctx, const float* x, const __nv_bfloat16* y, std::size_t n,
                         float* out) {
  if (n == 0) return;
  ctx.activate();
  detail::residual_add_kernel<<<detail::elementwise_grid(n, ctx.sm_count()), 256, 0, ctx.stream()>>>(x, y, n,
                                                                                                     out);
  QLORA_CUDA_CHECK_LAUNCH("residual_add_kernel");
}

}  // namespace cuda
}  // namespace qlora
