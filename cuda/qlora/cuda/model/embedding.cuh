#pragma once
// Token embedding on the device: x (M, D) fp32 = embed (V, D)[ids], the first residual stream.
//
// Forward only: the embedding is frozen in LoRA training (full-parameter training, whose backward
// scatters dx into embed rows by id, is the CPU model's alone). The ids are checked on the host
// before upload (cuda::LlamaModel), so the kernel trusts them.
#include <cstddef>
#include <cstdint>

#include "qlora/cuda/context.cuh"
#include "qlora/cuda/model/block_reduce.cuh"

namespace qlora {
namespace cuda {
namespace detail {

__global__ void __launch_bounds__(256)
    embedding_forward_kernel(const float* __restrict__ embed, const std::int64_t* __restrict__ ids,
                             std::size_t M, int D, float* __restrict__ x) {
  const std::size_t n = M * std::size_t(D), stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const std::size_t t = i / std::size_t(D), c = i % std::size_t(D);
    x[i] = embed[std::size_t(ids[t]) * std::size_t(D) + c];
  }
}

}  // namespace detail

// embed (V, D), ids (M) device, x (M, D) overwritten.
inline void embedding_forward(const Context& ctx, const float* embed, const std::int64_t* ids, std::int64_t M,
                              std::int64_t D, float* x) {
  if (M == 0) return;
  ctx.activate();
  const std::size_t n = std::size_t(M) * std::size_t(D);
  detail::embedding_forward_kernel<<<detail::elementwise_grid(n, ctx.sm_count()), 256, 0, ctx.stream()>>>(
      embed, ids, std::size_t(M), int(D), x);
  QLORA_CUDA_CHECK_LAUNCH("embedding_forward_kernel");
}

}  // namespace cuda
}  // namespace qlora
