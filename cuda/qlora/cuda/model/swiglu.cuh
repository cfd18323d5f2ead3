#pragma once
// The Llama MLP's gating, as model/llama.hpp computes it on the CPU, on bf16 (M, I) activations with
// fp32 arithmetic:
//
//   forward   act = silu(g) ⊙ u,  silu(g) = g · σ(g)
//   backward  du = dact ⊙ g·σ(g),  dg = dact ⊙ u ⊙ σ(g)·(1 + g·(1 − σ(g)))      (silu'(g))
//
// Backward reads the kept pre-activations g, u (M, I); nothing else is stored. expf is the accurate
// one (not __expf): these are the values the CPU reference gets from std::exp.
#include <cuda_bf16.h>

#include <cstddef>

#include "qlora/cuda/context.cuh"
#include "qlora/cuda/model/block_reduce.cuh"

namespace qlora {
namespace cuda {
namespace detail {

__global__ void __launch_bounds__(256)
    swiglu_forward_kernel(const __nv_bfloat16* __restrict__ gate, const __nv_bfloat16* __restrict__ up,
                          std::size_t n, __nv_bfloat16* __restrict__ act) {
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float g = __bfloat162float(gate[i]);
    act[i] = __float2bfloat16_rn(g / (1.0f + expf(-g)) * __bfloat162float(up[i]));
  }
}

// dg (not du) may alias dact: each element is read before it is written.
__global__ void __launch_bounds__(256)
    swiglu_backward_kernel(const __nv_bfloat16* dact, const __nv_bfloat16* __restrict__ gate,
                           const __nv_bfloat16* __restrict__ up, std::size_t n, __nv_bfloat16* dg,
                           __nv_bfloat16* du) {
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float g = __bfloat162float(gate[i]), u = __bfloat162float(up[i]), d = __bfloat162float(dact[i]);
    const float sg = 1.0f / (1.0f + expf(-g));
    du[i] = __float2bfloat16_rn(d * (g * sg));
    dg[i] = __float2bfloat16_rn(d * u * (sg * (1.0f + g * (1.0f - sg))));
  }
}

}  // namespace detail

// gate, up, act: (M, I) bf16, n = M·I.
inline void swiglu_forward(const Context& ctx, const __nv_bfloat16* gate, const __nv_bfloat16* up,
                           std::size_t n, __nv_bfloat16* act) {
  if (n == 0) return;
  ctx.activate();
  detail::swiglu_forward_kernel<<<detail::elementwise_grid(n, ctx.sm_count()), 256, 0, ctx.stream()>>>(
      gate, up, n, act);
  QLORA_CUDA_CHECK_LAUNCH("swiglu_forward_kernel");
}

// dact (M, I) -> dg, du (M, I), overwritten.
inline void swiglu_backward(const Context& ctx, const __nv_bfloat16* dact, const __nv_bfloat16* gate,
                            const __nv_bfloat16* up, std::size_t n, __nv_bfloat16* dg, __nv_bfloat16* du) {
  if (n == 0) return;
  ctx.activate();
  detail::swiglu_backward_kernel<<<detail::elementwise_grid(n, ctx.sm_count()), 256, 0, ctx.stream()>>>(
      dact, gate, up, n, dg, du);
  QLORA_CUDA_CHECK_LAUNCH("swiglu_backward_kernel");
}

}  // namespace cuda
}  // namespace qlora
