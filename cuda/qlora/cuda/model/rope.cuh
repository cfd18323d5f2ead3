#pragma once
// Rotary position embedding (model/rope.hpp: transformers' rotate-half layout) on the device, with
// the CPU's cos / sin table uploaded as is (positions, d), so both backends rotate by the same floats:
//
//   v[i]     = x1·cos[t, i]     − x2·(±sin[t, i])           x1 = v[i], x2 = v[i + d/2], i < d/2
//   v[i+d/2] = x2·cos[t, i+d/2] + x1·(±sin[t, i+d/2])       + forward, − backward (the transpose)
//
// Row b·T + t of x (B·T, heads·d) is at position t. The arithmetic is fp32; In / Out are the storage
// types: the forward rotates the bf16 q / k projections in place, the backward takes attention's
// fp32 dq / dk and writes the bf16 gradients of the q / k products. y may alias x when In == Out.
#include <cuda_bf16.h>

#include <cstddef>
#include <cstdint>

#include "qlora/cuda/context.cuh"
#include "qlora/cuda/model/block_reduce.cuh"

namespace qlora {
namespace cuda {
namespace detail {

template <class In, class Out>
__global__ void __launch_bounds__(256)
    rope_kernel(const In* x, Out* y, std::size_t rows, int T, int heads, int d,
                const float* __restrict__ cos_t, const float* __restrict__ sin_t, float sign) {
  const int half = d / 2;
  const std::size_t n = rows * std::size_t(heads) * std::size_t(half),
                    stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t k = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; k < n; k += stride) {
    const int i = int(k % std::size_t(half));
    const std::size_t rh = k / std::size_t(half);  // row · heads + head
    const std::size_t row = rh / std::size_t(heads);
    const int t = int(row % std::size_t(T));
    const std::size_t base = rh * std::size_t(d);  // rows are heads·d wide: (row·heads + head)·d
    const float* c = cos_t + std::size_t(t) * std::size_t(d);
    const float* s = sin_t + std::size_t(t) * std::size_t(d);
    const float x1 = to_f32(x[base + i]), x2 = to_f32(x[base + i + half]);
    y[base + i] = from_f32<Out>(x1 * c[i] - x2 * (sign * s[i]));
    y[base + i + half] = from_f32<Out>(x2 * c[i + half] + x1 * (sign * s[i + half]));
  }
}

}  // namespace detail

// x, y: (B·T, heads·d); cos_t, sin_t: (≥ T, d) device tables. inverse: the backward rotation.
template <class In, class Out>
void rope_apply(const Context& ctx, const In* x, Out* y, std::int64_t B, std::int64_t T, std::int64_t heads,
                std::int64_t d, const float* cos_t, const float* sin_t, bool inverse) {
  const std::size_t n = std::size_t(B * T) * std::size_t(heads) * std::size_t(d / 2);
  if (n == 0) return;
  ctx.activate();
  detail::rope_kernel<In, Out><<<detail::elementwise_grid(n, ctx.sm_count()), 256, 0, ctx.stream()>>>(
      x, y, std::size_t(B * T), int(T), int(heads), int(d), cos_t, sin_t, inverse ? -1.0f : 1.0f);
  QLORA_CUDA_CHECK_LAUNCH("rope_kernel");
}

}  // namespace cuda
}  // namespace qlora
