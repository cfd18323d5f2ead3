#pragma once
// fp32 -> bf16 (round to nearest even) on the device: the bf16 compute copies of the fp32 LoRA
// masters and of rank-r intermediates that feed a bf16 cuBLAS product; and bf16 -> fp32 (exact), a
// bf16 base weight widened for a merge.
#include <cuda_bf16.h>

#include <cstddef>

#include "qlora/cuda/context.cuh"

namespace qlora {
namespace cuda {
namespace detail {

__global__ void __launch_bounds__(256)
    cast_bf16_kernel(const float* __restrict__ in, std::size_t n, __nv_bfloat16* __restrict__ out) {
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = __float2bfloat16_rn(in[i]);
}

__global__ void __launch_bounds__(256)
    cast_float_kernel(const __nv_bfloat16* __restrict__ in, std::size_t n, float* __restrict__ out) {
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = __bfloat162float(in[i]);
}

}  // namespace detail

inline void cast_to_bf16(const Context& ctx, const float* in, std::size_t n, __nv_bfloat16* out) {
  if (n == 0) return;
  ctx.activate();
  const std::size_t want = (n + 255) / 256, cap = std::size_t(ctx.sm_count()) * 8;
  detail::cast_bf16_kernel<<<int(want < cap ? want : cap), 256, 0, ctx.stream()>>>(in, n, out);
  QLORA_CUDA_CHECK_LAUNCH("cast_bf16_kernel");
}

inline void cast_to_float(const Context& ctx, const __nv_bfloat16* in, std::size_t n, float* out) {
  if (n == 0) return;
  ctx.activate();
  const std::size_t want = (n + 255) / 256, cap = std::size_t(ctx.sm_count()) * 8;
  detail::cast_float_kernel<<<int(want < cap ? want : cap), 256, 0, ctx.stream()>>>(in, n, out);
  QLORA_CUDA_CHECK_LAUNCH("cast_float_kernel");
}

}  // namespace cuda
}  // namespace qlora
